"""Distribution distances between sets of images or clips: an offline Frechet distance on ImageNet VGG16
features, FID/KID/Inception Score through torch-fidelity from a local, checked Inception file, and FVD through
StyleGAN-V's TorchScript I3D from a local, checked file.

``FD-VGG16`` (reported as ``fd_vgg16``) is the Frechet distance of FID computed on a different network: the
ImageNet VGG16 backbone of the shared offline weights (``vgg16_features.safetensors``, found as LPIPS finds
its backbones), so every CPU run, test and CI job reports a distribution distance without a download. It is
not FID and its values are not comparable with FID's; FID itself needs the Inception weights file the user
names (see the protocol in BENCHMARKS.md).

Protocol of the features: images in [0, 1], grayscale repeated to 3 channels, resized to 128x128 (bilinear,
antialiased; a third of 224x224's cost, since these features run on CPUs), ImageNet mean/std normalisation,
VGG16's 13 conv layers, global average pool -> 512 values. Video: the same per frame, averaged over the frames
(``video_features``). Audio: ``FD-logmel`` on each clip's log-mel statistics (``audio_features``).

FID, KID and IS use torch-fidelity's Inception-v3 (the TensorFlow FID network, 299x299 inside, uint8 input) and
its formulas. No package ships its weights and torch-fidelity would download them when given no file, so the
user names the file (``--fid-weights PATH`` or ``$TOKGEN_FID_WEIGHTS``); it is checked by its full sha256 before
``torch.load`` reads it, and we always pass torch-fidelity a path, so it never downloads.

FVD uses StyleGAN-V's TorchScript port of the Kinetics-400 I3D (``i3d_torchscript.pt``), called as StyleGAN-V
calls it: clips (B, 3, T, H, W) of uint8 levels as floats, ``rescale=True, resize=True, return_features=True``
(the detector maps [0, 255] to [-1, 1] and resizes frames to 224x224 itself) -> (B, 400) logits before the
softmax; the Frechet distance is FID's. The user names the file (``--fvd-weights PATH`` or
``$TOKGEN_FVD_WEIGHTS``); a TorchScript archive carries code, so it is checked by its full sha256 before
``torch.jit.load`` opens it, and it is never downloaded. Clips need at least ``FVD_MIN_FRAMES`` (9) frames.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torchvision.models.vgg import cfgs, make_layers

from data.spectrogram import log_mel_spectrogram
from stage1_tokenizer.perceptual import BACKBONE_FILES, find_backbone, weight_dirs

FEATURE_SIZE = 128
AUDIO_MELS = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torch-fidelity's release of the TensorFlow FID Inception (2015-12-05) converted to PyTorch; pytorch-fid's
# pt_inception-2015-12-05-6726825d.pth is the same file. Full sha256 (95,628,359 bytes) as published beside
# the file name's 8-digit torch-hub prefix by several evaluators that pin it (e.g. the mmgen model table).
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
FID_WEIGHTS_ENV = "TOKGEN_FID_WEIGHTS"
KID_SUBSETS, KID_SUBSET_SIZE, IS_SPLITS = 100, 1000, 10  # torch-fidelity's defaults, smaller for small sets

# StyleGAN-V's TorchScript port of the Kinetics-400 I3D of TF-Hub (the network of the original FVD); 51,235,320
# bytes. Its full sha256 is pinned by many public repositories that use the file; the mirror holds the same file.
I3D_FILE = "i3d_torchscript.pt"
I3D_SHA256 = "bec6519f66ea534e953026b4ae2c65553c17bf105611c746d904657e5860a5e2"
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
I3D_MIRROR = "https://huggingface.co/flateon/FVD-I3D-torchscript"
FVD_WEIGHTS_ENV = "TOKGEN_FVD_WEIGHTS"
# The I3D halves time three times (a stride-2 conv, two stride-2 max pools, TensorFlow "SAME" padding: ceil) and
# its last average pool spans 2 steps: ceil(ceil(ceil(T / 2) / 2) / 2) >= 2 needs T >= 9. Shorter clips make the
# detector itself fail ("input image (T: 1 ...) smaller than kernel size"), so they are refused, never padded.
FVD_MIN_FRAMES = 9
I3D_BATCH = 8  # clips per I3D pass: 8 x 16 frames at 224x224 is StyleGAN-V's batch at 256x256


class VGGFeatures(nn.Module):
    """Frozen ImageNet VGG16 conv features, average-pooled: (B, C, H, W) in [0, 1] -> (B, 512) float32."""

    def __init__(self):
        super().__init__()
        self.features = make_layers(cfgs["D"])  # VGG16's conv layers only: its 120M-parameter classifier is unused
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    @classmethod
    def from_shared_weights(cls) -> "VGGFeatures":
        """Load the offline backbone; a clear error naming the folders searched when it is missing."""
        path = find_backbone("vgg")
        if path is None:
            searched = ", ".join(str(d) for d in weight_dirs())
            raise FileNotFoundError(f"the offline Frechet distance needs {BACKBONE_FILES['vgg']} (ImageNet VGG16); "
                                    f"not found in [{searched}]: set TOKGEN_WEIGHTS to its folder")
        model = cls()
        state = {k.removeprefix("features."): v for k, v in load_file(str(path)).items()}
        model.features.load_state_dict(state, strict=True)
        return model

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 1 or 3, H, W), got {tuple(x.shape)}")
        x = x.float().clamp(0, 1)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return self.features((x - self.mean) / self.std).mean(dim=(2, 3))


def image_features(model: VGGFeatures, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N, 512) float64 features, computed in batches on the model's device."""
    device = model.mean.device
    parts = [model(images[i:i + batch_size].to(device)).double().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, 512, dtype=torch.float64)


def video_features(model: VGGFeatures, clips: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """(N, C, T, H, W) in [0, 1] -> (N, 512) float64: per-frame VGG16 features averaged over the T frames."""
    n, _, t = clips.shape[:3]
    frames = clips.transpose(1, 2).flatten(0, 1)
    return image_features(model, frames, batch_size).view(n, t, -1).mean(1)


def audio_features(waves: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """(N, 1, T) or (N, T) waves -> (N, 2 * AUDIO_MELS) float64: mean and std over time of each log-mel band (dB)."""
    mel = log_mel_spectrogram(waves, sample_rate, n_mels=AUDIO_MELS)
    return torch.cat([mel.mean(-1), mel.std(-1)], dim=1).double()


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D), N, M >= 2.

    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2), in float64; the symmetric form
    keeps every matrix positive semi-definite, so eigh is stable also when N < D (singular covariances).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) and (M, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a Frechet distance needs at least 2 items per set, got {len(a)} and {len(b)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(value.clamp(min=0))


# ---- FID / KID / Inception Score (torch-fidelity, local weights) ----------------------------------------
def named_weights(path: str | Path | None, env: str) -> Path | None:
    """The file the user named: ``path``, else the environment variable ``env``, else None."""
    named = path if path is not None else os.environ.get(env) or None
    return Path(named).expanduser() if named is not None else None


def fid_weights_path(path: str | Path | None = None) -> Path | None:
    """The Inception file the user named: ``path``, else ``$TOKGEN_FID_WEIGHTS``, else None (no FID)."""
    return named_weights(path, FID_WEIGHTS_ENV)


def fid_weights_hint() -> str:
    """One line on how to get FID: the file to download (on a machine with internet) and how to name it."""
    return (f"FID/KID/IS not computed: download {INCEPTION_URL} and pass --fid-weights PATH "
            f"(or set {FID_WEIGHTS_ENV}=PATH)")


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_weights_file(path: Path, metric: str, network: str, file: str, sha256: str, url: str) -> Path:
    """``path`` when its full sha256 is ``sha256``; else FileNotFoundError / ValueError in one line naming the
    ``metric``, the standard ``network`` ``file`` and where to get it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{metric} weights {path}: no such file (expected {file} from {url})")
    digest = sha256_of(path)
    if digest != sha256:
        raise ValueError(f"{metric} weights {path} are not the standard {network} file {file}: sha256 "
                         f"{digest[:16]}... instead of {sha256}; download it from {url}")
    return path


def check_fid_weights(path: Path) -> Path:
    """``path`` when it is the standard Inception file; else FileNotFoundError / ValueError in one line."""
    return check_weights_file(path, "FID", "Inception", INCEPTION_FILE, INCEPTION_SHA256, INCEPTION_URL)


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID Inception-v3 from a checked local file.

    (B, C, H, W) in [0, 1] -> pool (B, 2048) for FID/KID and unbiased logits (B, 1008) for IS, float64. Inputs
    are quantized to uint8 (as PNG files would be) and grayscale repeated to 3 channels; torch-fidelity resizes
    to 299x299 with TensorFlow 1.x's bilinear resize.
    """

    def __init__(self, weights: str | Path):
        super().__init__()
        path = check_fid_weights(Path(weights))  # before torch.load: never unpickle an unchecked file
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(path))
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 1 or 3, H, W), got {tuple(x.shape)}")
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        pool, logits = self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)
        return pool.double(), logits.double()


def inception_metrics(real: torch.Tensor, fake: torch.Tensor, fake_logits: torch.Tensor) -> dict:
    """FID, KID (mean and std over subsets) and IS of the fake set, by torch-fidelity's formulas.

    real (N, 2048), fake (M, 2048) pool features and fake_logits (M, 1008), N, M >= 2. KID's subsets and IS's
    splits shrink to the set sizes (torch-fidelity refuses subsets larger than a set). FID's general eigvals of a
    2048x2048 product costs ~5-10 s on one CPU core, once per evaluation.
    """
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID/KID need at least 2 items per set, got {len(real)} and {len(fake)}")
    real, fake = real.double().cpu(), fake.double().cpu()
    fid = fid_statistics_to_metric(fid_features_to_statistics(real), fid_features_to_statistics(fake), False)
    kid = kid_features_to_metric(real, fake, kid_subsets=KID_SUBSETS, verbose=False,
                                 kid_subset_size=min(KID_SUBSET_SIZE, len(real), len(fake)))
    isc = isc_features_to_metric(fake_logits.double().cpu(), splits=min(IS_SPLITS, len(fake_logits)))
    return {"fid": fid["frechet_inception_distance"], "kid": kid["kernel_inception_distance_mean"],
            "kid_std": kid["kernel_inception_distance_std"], "inception_score": isc["inception_score_mean"],
            "inception_score_std": isc["inception_score_std"]}


# ---- FVD (StyleGAN-V's TorchScript I3D, local weights) ---------------------------------------------------
def fvd_weights_path(path: str | Path | None = None) -> Path | None:
    """The I3D file the user named: ``path``, else ``$TOKGEN_FVD_WEIGHTS``, else None (no FVD)."""
    return named_weights(path, FVD_WEIGHTS_ENV)


def fvd_weights_hint() -> str:
    """One line on how to get FVD: the file to download (on a machine with internet) and how to name it."""
    return (f"FVD not computed: download {I3D_URL} (or {I3D_FILE} from {I3D_MIRROR}) and pass --fvd-weights PATH "
            f"(or set {FVD_WEIGHTS_ENV}=PATH)")


def check_fvd_weights(path: Path) -> Path:
    """``path`` when it is StyleGAN-V's ``i3d_torchscript.pt``; else FileNotFoundError / ValueError in one line."""
    return check_weights_file(path, "FVD", "I3D", I3D_FILE, I3D_SHA256, I3D_URL)


def check_fvd_frames(frames: int) -> None:
    """A clear line (ValueError) for clips the I3D cannot take: fewer than ``FVD_MIN_FRAMES`` frames."""
    if frames < FVD_MIN_FRAMES:
        raise ValueError(f"FVD needs clips of at least {FVD_MIN_FRAMES} frames (the I3D halves time three times, "
                         f"then pools 2 steps), these have {frames}: evaluate longer clips, or drop --fvd-weights "
                         f"(and unset {FVD_WEIGHTS_ENV}) to evaluate without FVD")


class I3DFeatures(nn.Module):
    """StyleGAN-V's TorchScript Kinetics-400 I3D from a checked local file.

    (B, C, T, H, W) clips in [0, 1], T >= ``FVD_MIN_FRAMES`` -> (B, 400) float64 logits before the softmax (the
    features of FVD). Clips are quantized to uint8 levels (as PNG frames would be), kept as floats in [0, 255],
    grayscale repeated to 3 channels; the detector maps them to [-1, 1] and resizes the frames to 224x224 itself.
    """

    def __init__(self, weights: str | Path):
        super().__init__()
        path = check_fvd_weights(Path(weights))  # before torch.jit.load: a TorchScript archive carries code
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch's notice on TorchScript, the file's format
            self.net = torch.jit.load(str(path), map_location="cpu")
        self.register_buffer("anchor", torch.empty(0), persistent=False)  # follows .to(): where clips go
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected clips (B, 1 or 3, T, H, W), got {tuple(x.shape)}")
        check_fvd_frames(x.shape[2])
        x = (x.float().clamp(0, 1) * 255).round()
        x = x.expand(-1, 3, -1, -1, -1) if x.shape[1] == 1 else x
        features = self.net(x.to(self.anchor.device), rescale=True, resize=True, return_features=True)
        return features.double()


def i3d_features(model: I3DFeatures, clips: torch.Tensor, batch_size: int = I3D_BATCH) -> torch.Tensor:
    """(N, C, T, H, W) in [0, 1] -> (N, 400) float64 I3D features, ``batch_size`` clips a pass (the detector
    resizes every frame to 224x224: its memory grows with the clips and frames of a pass, whatever their size)."""
    parts = [model(clips[i:i + batch_size]).cpu() for i in range(0, len(clips), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, 400, dtype=torch.float64)


# ---- features gathered batch by batch ------------------------------------------------------------------
class PairedFeatures:
    """Features of real items and their reconstructions (or samples), gathered batch by batch.

    Only the features stay in memory (512 + 2048 + 1008 float64 values an image, 512 + 400 a clip), never the
    items. ``vgg`` gives ``fd_vgg16`` (images, and video through per-frame features); ``inception`` gives
    FID/KID/IS (images only); ``i3d`` gives FVD (video only). Any may be None.
    """

    def __init__(self, modality: str, vgg: VGGFeatures | None = None, inception: InceptionFeatures | None = None,
                 i3d: I3DFeatures | None = None):
        if modality not in ("image", "video"):
            raise ValueError(f"distribution distances on features are for images and video, got {modality!r}")
        self.modality, self.vgg = modality, vgg
        self.inception = inception if modality == "image" else None
        self.i3d = i3d if modality == "video" else None
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.frames: int | None = None  # the clips' T: an FVD compares only at one frame count

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.parts.setdefault(key, []).append(value.double().cpu())

    def update(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        """real, fake: (B, C, H, W) images or (B, C, T, H, W) clips in [0, 1], on the models' device."""
        if self.vgg is not None:
            features = video_features if self.modality == "video" else image_features
            self._add("vgg_real", features(self.vgg, real))
            self._add("vgg_fake", features(self.vgg, fake))
        if self.inception is not None:
            self._add("inception_real", self.inception(real)[0])
            pool, logits = self.inception(fake)
            self._add("inception_fake", pool)
            self._add("inception_logits", logits)
        if self.i3d is not None:
            self.frames = real.shape[2]
            self._add("i3d_real", i3d_features(self.i3d, real))
            self._add("i3d_fake", i3d_features(self.i3d, fake))

    def features(self, key: str) -> torch.Tensor:
        return torch.cat(self.parts[key])

    def metrics(self) -> dict:
        """``fd_vgg16`` (video: ``fd_vgg16_frames``), ``fid``/``kid``/``kid_std``/``inception_score``/
        ``inception_score_std`` (images) and ``fvd`` with ``fvd_frames`` (video) of what was gathered; empty where
        a model is missing or fewer than 2 items came."""
        out = {}
        if "vgg_real" in self.parts and len(self.features("vgg_real")) >= 2:
            key = "fd_vgg16_frames" if self.modality == "video" else "fd_vgg16"  # the name evaluate-samples uses
            out[key] = frechet_distance(self.features("vgg_real"), self.features("vgg_fake"))
        if "inception_real" in self.parts and len(self.features("inception_real")) >= 2:
            out.update(inception_metrics(self.features("inception_real"), self.features("inception_fake"),
                                         self.features("inception_logits")))
        if "i3d_real" in self.parts and len(self.features("i3d_real")) >= 2:
            out.update(fvd=frechet_distance(self.features("i3d_real"), self.features("i3d_fake")),
                       fvd_frames=self.frames)
        return out
