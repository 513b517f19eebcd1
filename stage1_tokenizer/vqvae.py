"""VQ-VAE tokenizer: conv encoder -> quantizer -> conv decoder, for 1-D, 2-D or 3-D inputs.

The quantizer is the kind ``config.quantizer.kind`` names (vq, rvq, fsq, lfq: quantizer_registry.py); a residual
quantizer's codes carry a depth axis, last: (B, *grid, stages).

Images are (B, C, H, W) in [0, 1], audio (B, 1, T) in [-1, 1], video (B, C, T, H, W) in [0, 1].
``encode`` gives a LongTensor code grid, ``decode`` maps codes back; both are exact inverses of what the
training ``forward`` does, so tokens are the interface to everything in stage 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stage1_tokenizer.base import Tokenizer, TokenizerConfig
from stage1_tokenizer.modules import Decoder, Encoder
from stage1_tokenizer.quantizer_registry import build_quantizer, encode_codes


@dataclass
class VQVAEConfig(TokenizerConfig):
    factors: tuple[int, ...] = (4, 4)  # downsampling per axis (time first for video)

    @property
    def level_factors(self) -> list[tuple[int, ...]]:
        return [tuple(self.factors)]


@dataclass
class VQVAEOutput:
    """recon: like the input; codes: (B, *grid) long ((B, *grid, stages) for rvq); losses are scalars; loss = their
    weighted sum (aux_loss: the quantizer's further penalty, lfq's entropy; 0 for the others)."""

    recon: torch.Tensor
    codes: torch.Tensor
    recon_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    aux_loss: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.recon_loss + self.codebook_loss + self.commitment_loss + self.aux_loss


class VQVAE(Tokenizer):
    """One level of codes: ``encode(x) -> (B, *grid)``, ``decode(codes) -> x`` (and the list forms of
    :class:`~stage1_tokenizer.base.Tokenizer`)."""

    config_class = VQVAEConfig
    model_type = "vqvae"

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        dims, width = self.dims, config.quantizer.dim
        self.encoder = Encoder(dims, config.in_channels, config.channels, config.num_res_blocks,
                               config.factors, width, config.patch, config.norm)
        self.quantizer = build_quantizer(config.quantizer)
        self.decoder = Decoder(dims, width, config.channels, config.num_res_blocks, config.factors,
                               config.in_channels, config.patch, config.norm)

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.config.quantizer.codebook_size]

    # ---- tokens -------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, num_stages: int | None = None) -> torch.Tensor:
        """x (B, C, *S) -> codes (B, *S / factors) long; rvq: (B, *S / factors, k), the first k = num_stages
        (default all) stages."""
        self.check_batch(x)
        return encode_codes(self.quantizer, self.encoder(self.to_model(x)), num_stages)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, *grid) long (rvq: (B, *grid, k), any k stages from the first) -> x (B, C, *grid * factors),
        not clamped."""
        self.check_codes([codes])
        return self.from_model(self.decoder(self.quantizer.lookup(codes.long())))

    def encode_levels(self, x: torch.Tensor, num_stages: int | None = None) -> list[torch.Tensor]:
        return [self.encode(x, num_stages)]

    def decode_levels(self, codes: list[torch.Tensor]) -> torch.Tensor:
        self.check_codes(codes)
        return self.decode(codes[0])

    # ---- training -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        self.check_batch(x)
        q = self.quantizer(self.encoder(self.to_model(x)))
        recon = self.from_model(self.decoder(q.z_q))
        return VQVAEOutput(recon=recon, codes=q.codes, recon_loss=self.recon_loss(recon, x),
                           codebook_loss=q.codebook_loss, commitment_loss=q.commitment_loss, perplexity=q.perplexity,
                           aux_loss=q.aux_loss)

