"""PatchGAN discriminator (pix2pix, taming-transformers' ``NLayerDiscriminator``) for 2-D images and 3-D clips.

Strided 4-wide convolutions halve the spatial axes ``num_layers`` times, one stride-1 layer follows, and a last
convolution gives one logit per overlapping patch: (B, 1, *S') for inputs (B, C, *S) in the data range [0, 1]
(mapped to [-1, 1] inside). A 3-D PatchGAN (video) keeps the time axis (kernel 3, stride 1), so every logit
judges a space-time patch and flicker between frames is as visible to it as blur within one.

The hidden layers normalise by batch statistics, as taming's BatchNorm, but over the whole global batch
(``GlobalBatchNorm``: the sums are all-reduced across DDP ranks, with gradients) and over real and reconstructed
inputs together (both sides of the game run them through one forward pass), with no running statistics (the
discriminator only ever sees training batches). So 2 processes train what 1 process trains, every rank holds
the same discriminator, and a global colour or brightness shift of the reconstructions stays visible to it:
per-sample normalisation (GroupNorm, ``norm: "group"``) removes exactly that, and on the photos it learned to
tell real from reconstructed several times slower (BENCHMARKS.md §15).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from data.modalities import MODALITY_DIMS, check_modality
from harness.distributed import all_reduce, all_reduce_with_grad
from stage1_tokenizer.gan_losses import DiscriminatorOutput
from stage1_tokenizer.modules import CONV, as_conv_input, channels_last, norm


@dataclass
class PatchGANConfig:
    modality: str = "image"  # image (2-D) | video (3-D)
    in_channels: int = 3
    channels: int = 64  # width of the first layer; doubles per strided layer up to 8x
    num_layers: int = 3  # strided layers: taming's default 3 sees 70x70 patches
    norm: str = "batch"  # batch (GlobalBatchNorm) | group | none: the hidden layers' normalisation

    def __post_init__(self):
        check_modality(self.modality)
        if self.modality == "audio":
            raise ValueError("PatchGAN is for images and video; audio uses the audio discriminator")
        if self.norm not in NORMS:
            raise ValueError(f"PatchGAN norm must be one of {sorted(NORMS)}, got {self.norm!r}")
        if self.num_layers < 1 or self.channels < 1:
            raise ValueError(f"PatchGAN needs num_layers >= 1 and channels >= 1, got {self.num_layers}, {self.channels}")


class GlobalBatchNorm(nn.Module):
    """Batch normalisation (B, C, *S) over the batch and spatial axes of every rank's batch together (statistics
    all-reduced, with gradients), in fp32, with a learned scale and shift; no running statistics."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            sums = all_reduce_with_grad(torch.stack([xf.sum(axes), xf.square().sum(axes)]))
            count = all_reduce(torch.tensor(float(x.numel() // x.shape[1]), device=x.device))
            mean = sums[0] / count
            var = (sums[1] / count - mean.square()).clamp_min(0.0)
            y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
            return (y * self.weight.view(shape) + self.bias.view(shape)).to(x.dtype)


NORMS = {"batch": lambda c: GlobalBatchNorm(c), "group": norm, "none": lambda c: nn.Identity()}


def _kernel_stride(dims: int, stride: int) -> dict:
    """4-wide spatial kernels (stride ``stride``, padding 1); video's time axis: kernel 3, stride 1, padding 1."""
    if dims == 3:
        return {"kernel_size": (3, 4, 4), "stride": (1, stride, stride), "padding": 1}
    return {"kernel_size": 4, "stride": stride, "padding": 1}


class PatchGAN(nn.Module):
    """x (B, C, *S) in [0, 1] -> ``DiscriminatorOutput`` with one logit map (B, 1, *S')."""

    def __init__(self, config: PatchGANConfig):
        super().__init__()
        self.config = config
        dims = MODALITY_DIMS[config.modality]
        conv, width = CONV[dims], config.channels
        blocks = [nn.Sequential(conv(config.in_channels, width, **_kernel_stride(dims, 2)), nn.LeakyReLU(0.2))]
        for n in range(1, config.num_layers + 1):
            stride = 2 if n < config.num_layers else 1  # the last hidden layer keeps the resolution
            out = config.channels * min(2 ** n, 8)
            blocks.append(nn.Sequential(conv(width, out, bias=config.norm == "none", **_kernel_stride(dims, stride)),
                                        NORMS[config.norm](out), nn.LeakyReLU(0.2)))
            width = out
        self.blocks = channels_last(nn.ModuleList(blocks), dims)
        self.head = channels_last(conv(width, 1, **_kernel_stride(dims, 1)), dims)
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> DiscriminatorOutput:
        h, features = as_conv_input(x * 2 - 1), []
        for block in self.blocks:
            h = block(h)
            features.append(h)
        return DiscriminatorOutput(logits=[self.head(h)], features=[features])


def _init(module: nn.Module) -> None:
    """DCGAN's initialisation, as taming: conv weights N(0, 0.02), norms at identity."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.GroupNorm, GlobalBatchNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
