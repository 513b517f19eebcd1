"""Quantizer kinds by name: ``build_quantizer(config)`` builds the one ``config.kind`` names, for ``VQVAE`` and for
every level of ``HierarchicalVQVAE``.

Kinds: ``vq`` (quantizer.VectorQuantizer), ``rvq`` (residual_quantizer.ResidualVectorQuantizer, codes with a depth
axis), ``fsq`` (fsq.FiniteScalarQuantizer) and ``lfq`` (lfq.LookupFreeQuantizer). All are our own code, not
vector-quantize-pytorch: they share one interface, fp32 code choice under autocast, all-reduced state with a
cross-rank checksum and exact resume through their saved buffers (each module's docstring says why for its kind).
"""
from __future__ import annotations

import torch

from stage1_tokenizer.fsq import FiniteScalarQuantizer
from stage1_tokenizer.lfq import LookupFreeQuantizer
from stage1_tokenizer.quantizer import QUANTIZER_KINDS, Quantizer, QuantizerConfig, VectorQuantizer
from stage1_tokenizer.residual_quantizer import ResidualVectorQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {
    "vq": VectorQuantizer,
    "rvq": ResidualVectorQuantizer,
    "fsq": FiniteScalarQuantizer,
    "lfq": LookupFreeQuantizer,
}
assert tuple(QUANTIZERS) == QUANTIZER_KINDS, "QuantizerConfig validates the kinds this registry builds"


def build_quantizer(config: QuantizerConfig) -> Quantizer:
    """The quantizer of kind ``config.kind`` (validated by the config)."""
    return QUANTIZERS[config.kind](config)


def encode_codes(quantizer: Quantizer, z: torch.Tensor, num_stages: int | None = None) -> torch.Tensor:
    """Codes of features z (B, D, *S): (B, *S), or (B, *S, k) for a residual quantizer, whose ``num_stages`` k
    defaults to all; other kinds have no stages to choose."""
    if isinstance(quantizer, ResidualVectorQuantizer):
        return quantizer.encode(z, num_stages=num_stages)
    if num_stages is not None:
        raise ValueError(f"num_stages applies to residual quantizers (kind 'rvq'), not {quantizer.config.kind!r}")
    return quantizer.encode(z)
