"""Hierarchical VQ-VAE (VQ-VAE-2) with L >= 2 levels, for 1-D, 2-D or 3-D inputs.

Level 0 is the bottom (finest) level, level L-1 the top. ``factors[k]`` is the downsampling from level
k-1 (the input for k = 0) to level k, so 256x256 images with factors ((4, 4), (2, 2)) give a 64x64
bottom and a 32x32 top grid; audio with ((8,), (4,), (4,)) gives Jukebox-style hops 8/32/128.

Quantization runs top-down: the top level quantizes its encoder features; every lower level quantizes
its encoder features together with the decoded levels above (upsampled to its resolution). One decoder
reconstructs the input from the bottom level's codes concatenated with that upsampled context, so it
uses all levels. Everything is convolutional: a tokenizer trained on 256 crops encodes whole photos.
Codes come and go top level first, as the priors sample them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.hub import PretrainedMixin
from stage1_tokenizer.modules import CONV, Decoder, Encoder, conv_factors
from stage1_tokenizer.quantizer import QuantizerConfig, VectorQuantizer
from stage1_tokenizer.vqvae import MODALITY_DIMS


@dataclass
class HierarchicalVQVAEConfig:
    modality: str = "image"
    in_channels: int = 3
    channels: tuple[int, ...] = (64, 128)  # widths of the bottom encoder and the final decoder
    hidden: int = 128  # width of the upper encoders and the level-to-level decoders
    num_res_blocks: int = 2
    factors: tuple[tuple[int, ...], ...] = ((4, 4), (2, 2))  # per level, bottom first
    patch: tuple[int, ...] | None = None  # the bottom level's first downsampling by folding (divides factors[0])
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)  # template for every level
    codebook_sizes: tuple[int, ...] = ()  # per level, top first; () = the template's size everywhere
    recon_loss: str = "mse"
    sample_rate: int = 0
    # Training only: the probability that a sample's lower levels are blanked (zeros) so the decoder has
    # to reconstruct from the levels above. Without it the bottom level, which sees the encoder features
    # directly, can carry everything and the upper levels collapse to a few near-constant codes. The
    # trainer can anneal it (``level_dropout_steps``) so training ends on the full path only.
    level_dropout: float = 0.0

    def __post_init__(self):
        if self.modality not in MODALITY_DIMS:
            raise ValueError(f"modality must be one of {sorted(MODALITY_DIMS)}, got {self.modality!r}")
        if len(self.factors) < 2:
            raise ValueError("a hierarchical VQ-VAE needs at least 2 levels (use VQVAE for one)")
        dims = MODALITY_DIMS[self.modality]
        if any(len(f) != dims for f in self.factors):
            raise ValueError(f"{self.modality} needs {dims} factors per level, got {self.factors}")
        if self.patch is not None:
            self.patch = tuple(self.patch)
            conv_factors(tuple(self.factors[0]), self.patch)  # clear error for a patch that does not divide
        if self.codebook_sizes and len(self.codebook_sizes) != len(self.factors):
            raise ValueError(f"codebook_sizes {self.codebook_sizes} must give one size per level ({len(self.factors)})")
        if not 0.0 <= self.level_dropout <= 1.0:
            raise ValueError(f"level_dropout must be in [0, 1], got {self.level_dropout}")

    @property
    def num_levels(self) -> int:
        return len(self.factors)

    @property
    def total_factors(self) -> tuple[int, ...]:
        return tuple(math.prod(f) for f in zip(*self.factors))


@dataclass
class HierarchicalVQVAEOutput:
    """recon like the input; codes top first; perplexity per level (top first)."""

    recon: torch.Tensor
    codes: list[torch.Tensor]
    recon_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: list[torch.Tensor]

    @property
    def loss(self) -> torch.Tensor:
        return self.recon_loss + self.codebook_loss + self.commitment_loss


class HierarchicalVQVAE(PretrainedMixin, nn.Module):
    config_class = HierarchicalVQVAEConfig
    model_type = "hvqvae"

    def __init__(self, config: HierarchicalVQVAEConfig):
        super().__init__()
        self.config = config
        dims, n, d, hid = self.dims, config.num_levels, config.quantizer.dim, config.hidden
        conv = CONV[dims]
        nrb = config.num_res_blocks
        # Bottom-up encoders: level 0 from the input, level k from level k-1's features.
        self.encoders = nn.ModuleList(
            [Encoder(dims, config.in_channels, config.channels, nrb, config.factors[0], hid, config.patch)]
            + [Encoder(dims, hid, (hid,), nrb, config.factors[k], hid) for k in range(1, n)]
        )
        # Pre-quantization 1x1 convs: the top sees its features; lower levels also the context from above.
        self.pre_quant = nn.ModuleList(conv(hid + (d if k < n - 1 else 0), d, 1) for k in range(n))
        sizes = self.codebook_sizes
        self.quantizers = nn.ModuleList(
            VectorQuantizer(replace(config.quantizer, codebook_size=sizes[n - 1 - k])) for k in range(n)
        )
        # up[k] maps level k+1's context (codes + what came from above) to level k's resolution.
        self.up = nn.ModuleList(
            Decoder(dims, self._context_channels(k + 1), (hid,), nrb, config.factors[k + 1], d) for k in range(n - 1)
        )
        self.decoder = Decoder(dims, self._context_channels(0), config.channels, nrb, config.factors[0],
                               config.in_channels, config.patch)

    def _context_channels(self, level: int) -> int:
        d = self.config.quantizer.dim
        return d if level == self.config.num_levels - 1 else 2 * d

    # ---- shapes -------------------------------------------------------------------------------
    @property
    def dims(self) -> int:
        return MODALITY_DIMS[self.config.modality]

    @property
    def num_levels(self) -> int:
        return self.config.num_levels

    @property
    def codebook_sizes(self) -> list[int]:
        """Per level, top first."""
        return list(self.config.codebook_sizes) or [self.config.quantizer.codebook_size] * self.num_levels

    def code_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Input (C, *S) -> code grid shapes, top first."""
        self._check_input_shape(tuple(input_shape))
        shapes, size = [], tuple(input_shape[1:])
        for f in self.config.factors:
            size = tuple(s // k for s, k in zip(size, f))
            shapes.append(size)
        return shapes[::-1]

    def _check_input_shape(self, shape: tuple[int, ...]) -> None:
        c, spatial = shape[0], shape[1:]
        if len(spatial) != self.dims or c != self.config.in_channels:
            raise ValueError(f"this {self.config.modality} tokenizer takes (B, {self.config.in_channels}, "
                             f"{', '.join('*' * self.dims)}) inputs, got (B, {shape})")
        total = self.config.total_factors
        if any(s % f for s, f in zip(spatial, total)):
            raise ValueError(f"input size {spatial} must be divisible by the total downsampling {total}")

    def _check_batch(self, x: torch.Tensor) -> None:
        if x.dim() != self.dims + 2:
            raise ValueError(f"expected a batch with {self.dims} spatial dims, got shape {tuple(x.shape)}")
        self._check_input_shape(tuple(x.shape[1:]))

    # ---- value range (as VQVAE) ---------------------------------------------------------------
    def _to_model(self, x):
        return x if self.config.modality == "audio" else x * 2 - 1

    def _from_model(self, y):
        return y if self.config.modality == "audio" else (y + 1) / 2

    # ---- the top-down pass --------------------------------------------------------------------
    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features per level, bottom first."""
        feats, h = [], self._to_model(x)
        for enc in self.encoders:
            h = enc(h)
            feats.append(h)
        return feats

    def _descend(self, feats, quantize):
        """Top-down: ``quantize(level, z)`` gives (z_q, extra) per level; returns the bottom context
        (input of the final decoder) and the extras, top first."""
        context, extras = None, []
        for k in reversed(range(self.num_levels)):
            z = feats[k] if context is None else torch.cat([feats[k], context], dim=1)
            z_q, extra = quantize(k, self.pre_quant[k](z))
            extras.append(extra)
            context = z_q if context is None else torch.cat([z_q, context], dim=1)
            if k > 0:
                context = self.up[k - 1](context)
        return context, extras

    def encode_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, C, *S) -> code grids, top first."""
        self._check_batch(x)
        feats = self._features(x)

        def quantize(k, z):
            codes = self.quantizers[k].encode(z)
            return self.quantizers[k].lookup(codes), codes

        return self._descend(feats, quantize)[1]

    def decode_levels(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Code grids, top first -> x (B, C, *S), not clamped."""
        if len(codes) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} code grids (top first), got {len(codes)}")
        for c in codes:
            if c.dim() != self.dims + 1:
                raise ValueError(f"expected code grids (B, {'*, ' * (self.dims - 1)}*), got shape {tuple(c.shape)}")
        context = None
        for k in reversed(range(self.num_levels)):
            z_q = self.quantizers[k].lookup(codes[self.num_levels - 1 - k].long())
            if context is not None and context.shape[2:] != z_q.shape[2:]:
                raise ValueError(f"level-{k} codes {tuple(z_q.shape[2:])} do not fit the level above "
                                 f"({tuple(context.shape[2:])} after upsampling)")
            context = z_q if context is None else torch.cat([z_q, context], dim=1)
            if k > 0:
                context = self.up[k - 1](context)
        return self._from_model(self.decoder(context))

    encode = encode_levels
    decode = decode_levels

    def _level_keep_masks(self, batch: int, device, p: float) -> list[torch.Tensor]:
        """Per level (bottom first), a (B, 1, ...) mask of 0/1: with probability ``p`` a sample draws a
        level j in 1..L-1 uniformly and its levels below j are blanked. All ones in eval mode."""
        ones = torch.ones((batch,) + (1,) * (self.dims + 1), device=device)
        if not self.training or p == 0:
            return [ones] * self.num_levels
        dropped = torch.rand(batch, device=device) < p
        lowest_kept = torch.where(dropped, torch.randint(1, self.num_levels, (batch,), device=device), 0)
        return [(lowest_kept <= k).float().view_as(ones) for k in range(self.num_levels)]

    def forward(self, x: torch.Tensor, level_dropout: float | None = None) -> HierarchicalVQVAEOutput:
        """Training forward; ``level_dropout`` overrides the config's rate (the trainer anneals it)."""
        self._check_batch(x)
        feats = self._features(x)
        p = self.config.level_dropout if level_dropout is None else level_dropout
        keep = self._level_keep_masks(x.shape[0], x.device, p)

        def quantize(k, z):
            out = self.quantizers[k](z)
            return out.z_q * keep[k].to(out.z_q.dtype), out

        context, outs = self._descend(feats, quantize)
        recon = self._from_model(self.decoder(context))
        loss_fn = F.mse_loss if self.config.recon_loss == "mse" else F.l1_loss
        return HierarchicalVQVAEOutput(
            recon=recon,
            codes=[q.codes for q in outs],
            recon_loss=loss_fn(recon.float(), x.float()),
            codebook_loss=sum(q.codebook_loss for q in outs),
            commitment_loss=sum(q.commitment_loss for q in outs),
            perplexity=[q.perplexity for q in outs],
        )
