"""LPIPS perceptual distance with offline ImageNet backbones.

lpips ships its calibration layers but downloads the AlexNet/VGG backbone through torchvision at first
use. We look for the backbone as safetensors first (``$TOKGEN_WEIGHTS``, then ``shared/weights`` and
``../shared/weights`` beside the project and the working directory), then let lpips download it, and
when neither works say both.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import lpips
import torch
from safetensors.torch import load_file
from torch import nn

BACKBONE_FILES = {"alex": "alexnet_features.safetensors", "vgg": "vgg16_features.safetensors"}


def weight_dirs() -> list[Path]:
    project = Path(__file__).resolve().parent.parent
    dirs = [Path(os.environ["TOKGEN_WEIGHTS"])] if os.environ.get("TOKGEN_WEIGHTS") else []
    for base in (Path.cwd(), project):
        dirs += [base / "shared" / "weights", base.parent / "shared" / "weights"]
    return dirs


def find_backbone(net: str) -> Path | None:
    for folder in weight_dirs():
        path = folder / BACKBONE_FILES[net]
        if path.is_file():
            return path
    return None


def _quiet_lpips(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation noise about `pretrained`
        return lpips.LPIPS(verbose=False, **kwargs)


def load_lpips(net: str = "alex") -> nn.Module:
    """An eval-mode, frozen ``lpips.LPIPS``; inputs in [-1, 1], (B, 3, H, W)."""
    if net not in BACKBONE_FILES:
        raise ValueError(f"LPIPS net must be one of {sorted(BACKBONE_FILES)}, got {net!r}")
    local = find_backbone(net)
    if local is not None:
        model = _quiet_lpips(net=net, pnet_rand=True)
        _load_backbone(model.net, local)
    else:
        try:
            model = _quiet_lpips(net=net)
        except Exception as err:  # no network: urllib/HTTP errors of many kinds
            searched = ", ".join(str(d) for d in weight_dirs())
            raise RuntimeError(
                f"LPIPS needs the ImageNet {net} backbone: {BACKBONE_FILES[net]} was not found in "
                f"[{searched}] (set TOKGEN_WEIGHTS to its folder), and downloading it failed: {err}"
            ) from err
    model.eval().requires_grad_(False)
    return model


def _load_backbone(backbone: nn.Module, path: Path) -> None:
    """Map torchvision ``features.{i}.*`` keys onto lpips' ``slice{k}.{i}.*`` modules."""
    state = load_file(str(path))
    by_index = {name.split(".")[-1]: name for name, m in backbone.named_modules() if "." in name}
    mapped = {}
    for key, value in state.items():
        _, index, kind = key.split(".")
        if index not in by_index:
            raise ValueError(f"{path}: key {key} has no matching layer in the LPIPS backbone")
        mapped[f"{by_index[index]}.{kind}"] = value
    backbone.load_state_dict(mapped, strict=True)


class PerceptualLoss(nn.Module):
    """LPIPS between images in [0, 1]; grayscale inputs are repeated to 3 channels."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        self.lpips = load_lpips(net)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (B, C, H, W) in [0, 1] -> (B,) distances."""
        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        with torch.autocast(x.device.type, enabled=False):
            return self.lpips(x.float() * 2 - 1, y.float() * 2 - 1).flatten()
