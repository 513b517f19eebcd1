"""VQ-VAE tokenizer: conv encoder -> vector quantizer -> conv decoder, for 1-D, 2-D or 3-D inputs.

Images are (B, C, H, W) in [0, 1], audio (B, 1, T) in [-1, 1], video (B, C, T, H, W) in [0, 1].
``encode`` gives a LongTensor code grid, ``decode`` maps codes back; both are exact inverses of what the
training ``forward`` does, so tokens are the interface to everything in stage 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stage1_tokenizer.base import Tokenizer, TokenizerConfig
from stage1_tokenizer.modules import Decoder, Encoder
from stage1_tokenizer.quantizer import VectorQuantizer


@dataclass
class VQVAEConfig(TokenizerConfig):
    factors: tuple[int, ...] = (4, 4)  # downsampling per axis (time first for video)

    @property
    def level_factors(self) -> list[tuple[int, ...]]:
        return [tuple(self.factors)]


@dataclass
class VQVAEOutput:
    """recon: like the input; codes: (B, *grid) long; losses are scalars; loss = their weighted sum."""

    recon: torch.Tensor
    codes: torch.Tensor
    recon_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.recon_loss + self.codebook_loss + self.commitment_loss


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
                               config.factors, width, config.patch)
        self.quantizer = VectorQuantizer(config.quantizer)
        self.decoder = Decoder(dims, width, config.channels, config.num_res_blocks, config.factors,
                               config.in_channels, config.patch)

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.config.quantizer.codebook_size]

    # ---- tokens -------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, *S) -> codes (B, *S / factors) long."""
        self.check_batch(x)
        return self.quantizer.encode(self.encoder(self.to_model(x)))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, *grid) long -> x (B, C, *grid * factors), not clamped."""
        self.check_codes([codes])
        return self.from_model(self.decoder(self.quantizer.lookup(codes.long())))

    def encode_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.encode(x)]

    def decode_levels(self, codes: list[torch.Tensor]) -> torch.Tensor:
        self.check_codes(codes)
        return self.decode(codes[0])

    # ---- training -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        self.check_batch(x)
        q = self.quantizer(self.encoder(self.to_model(x)))
        recon = self.from_model(self.decoder(q.z_q))
        return VQVAEOutput(recon=recon, codes=q.codes, recon_loss=self.recon_loss(recon, x),
                           codebook_loss=q.codebook_loss, commitment_loss=q.commitment_loss, perplexity=q.perplexity)

