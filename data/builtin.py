"""Built-in offline datasets: ``digits`` (scikit-learn) and ``photos`` (scikit-image).

Both ship inside their packages, so they work with no network. They are small,
so they are loaded eagerly at construction (unlike file readers).

Photos: only the bundled *colour* photographs are used. Synthetic images
(logo, colorwheel) and grayscale ones (camera, coins, moon, ...) are left out
so the colour statistics stay natural; ``cat`` is the same picture as
``chelsea``. ``skin``/``lily``/``kidney``/``brain`` need a download and are
excluded on purpose.

The split keeps the most colourful photo (``astronaut``: saturated reds, blues, whites) in training:
with it held out, the five remaining photos are nearly all browns and oranges and a tokenizer trained
on them cannot reproduce its colours. The held-out photos (``coffee``, ``chelsea``) lie inside the
training gamut, so they measure generalisation rather than a colour shift.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .common import make_sample, match_channels, resize_shorter

PHOTOS_TRAIN = ("astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
PHOTOS_EVAL = ("coffee", "chelsea")
DIGITS_EVAL_EVERY = 6  # held-out digits: index % 6 == 0 (300 of 1797)


# ---------------------------------------------------------------- digits


def digits_indices(split: str, total: int = 1797) -> list[int]:
    """Fixed split: eval = every 6th index, train = the rest."""
    held_out = split == "eval"
    return [i for i in range(total) if (i % DIGITS_EVAL_EVERY == 0) == held_out]


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """-> images (1797, 1, 8, 8) float in [0, 1], labels (1797,) long."""
    from sklearn import datasets  # only the built-in sets need scikit-learn (0.9 s to import)

    bunch = datasets.load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    return images, torch.as_tensor(bunch.target, dtype=torch.long)


class DigitsDataset(Dataset):
    """scikit-learn 8x8 digits, bilinearly upsampled to (channels, size, size); labels 0..9.

    Fully deterministic in both splits (no augmentation).
    """

    def __init__(self, *, split: str = "train", size: int = 32, channels: int = 3):
        images, labels = load_digits()
        self.indices = digits_indices(split, len(labels))
        idx = torch.tensor(self.indices)
        # Rendered once: 1797 x 32 x 32 floats is ~7 MB.
        self.images = F.interpolate(images[idx], size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
        self.labels = labels[idx].tolist()
        self.channels = channels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        x = match_channels(self.images[i], self.channels)
        return make_sample(x, self.labels[i], f"digits/{self.indices[i]}")


# ---------------------------------------------------------------- photos


@functools.lru_cache(maxsize=None)
def _photo_uint8(name: str) -> torch.Tensor:
    """Bundled scikit-image photo -> uint8 (3, H, W); cached (kept uint8 to save memory)."""
    import skimage.data  # only the built-in photos need scikit-image

    if name not in PHOTOS_TRAIN + PHOTOS_EVAL:
        raise ValueError(f"unknown photo {name!r}; choose from {PHOTOS_TRAIN + PHOTOS_EVAL}")
    return torch.from_numpy(getattr(skimage.data, name)()[..., :3].copy()).permute(2, 0, 1).contiguous()


def load_photo(name: str) -> torch.Tensor:
    """Full-size built-in photo -> FloatTensor (3, H, W) in [0, 1]."""
    return _photo_uint8(name).float() / 255.0


def _photo_at_least(name: str, size: int) -> torch.Tensor:
    """uint8 (3, H, W) photo, upscaled (shorter side -> size) only if smaller than size."""
    img = _photo_uint8(name)
    if min(img.shape[-2:]) >= size:
        return img
    return (resize_shorter(img.float() / 255.0, size) * 255.0).round().to(torch.uint8)


def tile_grid(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """Top-left corners of the non-overlapping size x size tiles of an image, row-major."""
    return [(top, left) for top in range(0, height - size + 1, size) for left in range(0, width - size + 1, size)]


class PhotosDataset(Dataset):
    """Crops of the bundled scikit-image colour photos; labels -1.

    train: virtual length ``crops_per_epoch``; every item is a random crop of a
    uniformly chosen train photo with random horizontal flip (torch global RNG,
    the index is ignored). eval: fixed grid of non-overlapping crops of the
    ``PHOTOS_EVAL`` photos (use ``load_photo`` for the whole pictures).
    """

    def __init__(self, *, split: str = "train", size: int = 32, channels: int = 3, crops_per_epoch: int = 2000):
        self.train, self.size, self.channels = split == "train", size, channels
        self.names = PHOTOS_TRAIN if self.train else PHOTOS_EVAL
        self.photos = {name: _photo_at_least(name, size) for name in self.names}
        self.crops_per_epoch = crops_per_epoch
        self.tiles = [
            (name, top, left) for name in self.names for top, left in tile_grid(*self.photos[name].shape[-2:], size)
        ]

    def __len__(self) -> int:
        return self.crops_per_epoch if self.train else len(self.tiles)

    def _random_tile(self) -> tuple[str, int, int, bool]:
        name = self.names[int(torch.randint(len(self.names), (1,)))]
        h, w = self.photos[name].shape[-2:]
        top = int(torch.randint(0, h - self.size + 1, (1,)))
        left = int(torch.randint(0, w - self.size + 1, (1,)))
        return name, top, left, bool(torch.rand(()) < 0.5)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):  # keeps plain `for sample in dataset` finite
            raise IndexError(i)
        if self.train:
            name, top, left, flip = self._random_tile()
        else:
            (name, top, left), flip = self.tiles[i], False
        x = self.photos[name][:, top : top + self.size, left : left + self.size].float() / 255.0
        if flip:
            x = x.flip(-1)
        key = f"photos/{name}/y{top}_x{left}" + ("_flip" if flip else "")
        return make_sample(match_channels(x, self.channels), -1, key)
