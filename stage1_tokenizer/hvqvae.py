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

from dataclasses import dataclass, replace

import torch
from torch import nn

from stage1_tokenizer.base import Tokenizer, TokenizerConfig
from stage1_tokenizer.modules import CONV, Decoder, Encoder
from stage1_tokenizer.quantizer_registry import build_quantizer, encode_codes


@dataclass
class HierarchicalVQVAEConfig(TokenizerConfig):
    """``channels`` are the widths of the bottom encoder and the final decoder; ``quantizer`` is the template
    of every level's quantizer; ``patch`` folds the bottom level's first downsampling (divides factors[0])."""

    hidden: int = 128  # width of the upper encoders and the level-to-level decoders
    factors: tuple[tuple[int, ...], ...] = ((4, 4), (2, 2))  # per level, bottom first
    codebook_sizes: tuple[int, ...] = ()  # per level, top first; () = the template's size everywhere
    # Training only: the probability that a sample's lower levels are blanked (zeros) so the decoder has
    # to reconstruct from the levels above. Without it the bottom level, which sees the encoder features
    # directly, can carry everything and the upper levels collapse to a few near-constant codes. The
    # trainer can anneal it (``level_dropout_steps``) so training ends on the full path only.
    level_dropout: float = 0.0

    @property
    def level_factors(self) -> list[tuple[int, ...]]:
        return [tuple(f) for f in self.factors]

    def __post_init__(self):
        if len(self.factors) < 2:
            raise ValueError("a hierarchical VQ-VAE needs at least 2 levels (use VQVAE for one)")
        super().__post_init__()
        if self.codebook_sizes and len(self.codebook_sizes) != len(self.factors):
            raise ValueError(f"codebook_sizes {self.codebook_sizes} must give one size per level ({len(self.factors)})")
        implicit = self.quantizer.kind in ("fsq", "lfq")
        if implicit and any(k != self.quantizer.codebook_size for k in self.codebook_sizes):
            raise ValueError(f"codebook_sizes {list(self.codebook_sizes)} differ from the {self.quantizer.kind} "
                             f"quantizer's {self.quantizer.codebook_size} codes, which its levels/bits fix for "
                             "every level: leave codebook_sizes empty")
        if not 0.0 <= self.level_dropout <= 1.0:
            raise ValueError(f"level_dropout must be in [0, 1], got {self.level_dropout}")

    @property
    def num_levels(self) -> int:
        return len(self.factors)


@dataclass
class HierarchicalVQVAEOutput:
    """recon like the input; codes top first; perplexity per level (top first); the losses sum the levels'
    (aux_loss: the quantizers' further penalties, lfq's entropy; 0 for the other kinds)."""

    recon: torch.Tensor
    codes: list[torch.Tensor]
    recon_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: list[torch.Tensor]
    aux_loss: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.recon_loss + self.codebook_loss + self.commitment_loss + self.aux_loss


class HierarchicalVQVAE(Tokenizer):
    """VQ-VAE-2 with any number of levels (see the module docstring): ``encode_levels(x)`` gives one code grid
    per level, top first, and ``decode_levels`` takes them back."""

    config_class = HierarchicalVQVAEConfig
    model_type = "hvqvae"

    def __init__(self, config: HierarchicalVQVAEConfig):
        super().__init__()
        self.config = config
        dims, n, d, hid = self.dims, config.num_levels, config.quantizer.dim, config.hidden
        conv = CONV[dims]
        nrb, nk = config.num_res_blocks, config.norm
        # Bottom-up encoders: level 0 from the input, level k from level k-1's features.
        self.encoders = nn.ModuleList(
            [Encoder(dims, config.in_channels, config.channels, nrb, config.factors[0], hid, config.patch, nk)]
            + [Encoder(dims, hid, (hid,), nrb, config.factors[k], hid, norm_kind=nk) for k in range(1, n)]
        )
        # Pre-quantization 1x1 convs: the top sees its features; lower levels also the context from above.
        self.pre_quant = nn.ModuleList(conv(hid + (d if k < n - 1 else 0), d, 1) for k in range(n))
        sizes = self.codebook_sizes
        # (fsq/lfq: their config fixes codebook_size from levels/bits, and the config checked the sizes agree)
        self.quantizers = nn.ModuleList(
            build_quantizer(replace(config.quantizer, codebook_size=sizes[n - 1 - k])) for k in range(n)
        )
        # up[k] maps level k+1's context (codes + what came from above) to level k's resolution.
        self.up = nn.ModuleList(
            Decoder(dims, self._context_channels(k + 1), (hid,), nrb, config.factors[k + 1], d, norm_kind=nk)
            for k in range(n - 1)
        )
        self.decoder = Decoder(dims, self._context_channels(0), config.channels, nrb, config.factors[0],
                               config.in_channels, config.patch, nk)

    def _context_channels(self, level: int) -> int:
        d = self.config.quantizer.dim
        return d if level == self.config.num_levels - 1 else 2 * d

    @property
    def codebook_sizes(self) -> list[int]:
        """Per level, top first."""
        return list(self.config.codebook_sizes) or [self.config.quantizer.codebook_size] * self.num_levels

    # ---- the top-down pass --------------------------------------------------------------------
    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features per level, bottom first."""
        feats, h = [], self.to_model(x)
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

    def encode_levels(self, x: torch.Tensor, num_stages: int | None = None) -> list[torch.Tensor]:
        """x (B, C, *S) -> code grids, top first; rvq: (B, *grid, k) each, the first k = num_stages (default all)
        stages of every level (the levels below see the upper levels decoded from those k stages)."""
        self.check_batch(x)
        feats = self._features(x)

        def quantize(k, z):
            codes = encode_codes(self.quantizers[k], z, num_stages)
            return self.quantizers[k].lookup(codes), codes

        return self._descend(feats, quantize)[1]

    def decode_levels(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Code grids, top first -> x (B, C, *S), not clamped."""
        self.check_codes(codes)
        context = None
        for k in reversed(range(self.num_levels)):
            z_q = self.quantizers[k].lookup(codes[self.num_levels - 1 - k].long())
            if context is not None and context.shape[2:] != z_q.shape[2:]:
                raise ValueError(f"level-{k} codes {tuple(z_q.shape[2:])} do not fit the level above "
                                 f"({tuple(context.shape[2:])} after upsampling)")
            context = z_q if context is None else torch.cat([z_q, context], dim=1)
            if k > 0:
                context = self.up[k - 1](context)
        return self.from_model(self.decoder(context))

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
        self.check_batch(x)
        feats = self._features(x)
        p = self.config.level_dropout if level_dropout is None else level_dropout
        keep = self._level_keep_masks(x.shape[0], x.device, p)

        def quantize(k, z):
            out = self.quantizers[k](z)
            return out.z_q * keep[k].to(out.z_q.dtype), out

        context, outs = self._descend(feats, quantize)
        recon = self.from_model(self.decoder(context))
        return HierarchicalVQVAEOutput(
            recon=recon,
            codes=[q.codes for q in outs],
            recon_loss=self.recon_loss(recon, x),
            codebook_loss=sum(q.codebook_loss for q in outs),
            commitment_loss=sum(q.commitment_loss for q in outs),
            perplexity=[q.perplexity for q in outs],
            aux_loss=sum(q.aux_loss for q in outs),
        )
