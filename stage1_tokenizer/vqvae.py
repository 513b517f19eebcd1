"""VQ-VAE tokenizer: conv encoder -> vector quantizer -> conv decoder, for 1-D, 2-D or 3-D inputs.

Images are (B, C, H, W) in [0, 1], audio (B, 1, T) in [-1, 1], video (B, C, T, H, W) in [0, 1].
``encode`` gives a LongTensor code grid, ``decode`` maps codes back; both are exact inverses of what the
training ``forward`` does, so tokens are the interface to everything in stage 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.hub import PretrainedMixin
from stage1_tokenizer.modules import Decoder, Encoder, conv_factors
from stage1_tokenizer.quantizer import QuantizerConfig, VectorQuantizer

MODALITY_DIMS = {"audio": 1, "image": 2, "video": 3}


@dataclass
class VQVAEConfig:
    modality: str = "image"  # image | audio | video: fixes the input rank and value range
    in_channels: int = 3
    channels: tuple[int, ...] = (64, 128)  # width before/after each downsampling stage
    num_res_blocks: int = 2
    factors: tuple[int, ...] = (4, 4)  # downsampling per axis (time first for video)
    patch: tuple[int, ...] | None = None  # first downsampling by folding patches into channels (divides factors)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    recon_loss: str = "mse"  # mse | l1
    sample_rate: int = 0  # audio only

    def __post_init__(self):
        if self.modality not in MODALITY_DIMS:
            raise ValueError(f"modality must be one of {sorted(MODALITY_DIMS)}, got {self.modality!r}")
        if len(self.factors) != MODALITY_DIMS[self.modality]:
            raise ValueError(f"{self.modality} needs {MODALITY_DIMS[self.modality]} factors, got {self.factors}")
        if self.patch is not None:
            self.patch = tuple(self.patch)
            conv_factors(self.factors, self.patch)  # clear error for a patch that does not divide the factors
        if self.recon_loss not in ("mse", "l1"):
            raise ValueError(f"recon_loss must be 'mse' or 'l1', got {self.recon_loss!r}")


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


class VQVAE(PretrainedMixin, nn.Module):
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

    # ---- shapes -------------------------------------------------------------------------------
    @property
    def dims(self) -> int:
        return MODALITY_DIMS[self.config.modality]

    @property
    def num_levels(self) -> int:
        return 1

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.config.quantizer.codebook_size]

    def code_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Input shape (C, *S) without batch -> [code grid shape], one per level."""
        self._check_input_shape(tuple(input_shape))
        return [tuple(s // f for s, f in zip(input_shape[1:], self.config.factors))]

    def _check_input_shape(self, shape: tuple[int, ...]) -> None:
        c, spatial = shape[0], shape[1:]
        if len(spatial) != self.dims or c != self.config.in_channels:
            raise ValueError(
                f"this {self.config.modality} tokenizer takes (B, {self.config.in_channels}, "
                f"{', '.join('*' * self.dims)}) inputs with {self.dims} spatial dims, got (B, {shape})"
            )
        bad = [s for s, f in zip(spatial, self.config.factors) if s % f]
        if bad:
            raise ValueError(f"input size {spatial} must be divisible by the downsampling {self.config.factors}")

    # ---- value range --------------------------------------------------------------------------
    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.config.modality == "audio" else x * 2 - 1

    def _from_model(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.config.modality == "audio" else (y + 1) / 2

    # ---- tokens -------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, *S) -> codes (B, *S / factors) long."""
        if x.dim() != self.dims + 2:
            raise ValueError(f"expected a batch (B, C, {'*, ' * (self.dims - 1)}*), got shape {tuple(x.shape)}")
        self._check_input_shape(tuple(x.shape[1:]))
        return self.quantizer.encode(self.encoder(self._to_model(x)))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, *grid) long -> x (B, C, *grid * factors), not clamped."""
        if codes.dim() != self.dims + 1:
            raise ValueError(f"expected codes (B, {'*, ' * (self.dims - 1)}*), got shape {tuple(codes.shape)}")
        return self._from_model(self.decoder(self.quantizer.lookup(codes.long())))

    def encode_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.encode(x)]

    def decode_levels(self, codes: list[torch.Tensor]) -> torch.Tensor:
        if len(codes) != 1:
            raise ValueError(f"a single-level tokenizer decodes one code grid, got {len(codes)}")
        return self.decode(codes[0])

    # ---- training -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        if x.dim() != self.dims + 2:
            raise ValueError(f"expected a batch with {self.dims} spatial dims, got shape {tuple(x.shape)}")
        self._check_input_shape(tuple(x.shape[1:]))
        q = self.quantizer(self.encoder(self._to_model(x)))
        recon = self._from_model(self.decoder(q.z_q))
        loss_fn = F.mse_loss if self.config.recon_loss == "mse" else F.l1_loss
        return VQVAEOutput(
            recon=recon,
            codes=q.codes,
            recon_loss=loss_fn(recon.float(), x.float()),
            codebook_loss=q.codebook_loss,
            commitment_loss=q.commitment_loss,
            perplexity=q.perplexity,
        )
