"""What every prior shares: the interface the sampler, the pipeline and the coder rely on.

A prior models codes (B, *grid) in raster order (last axis fastest). ``forward`` gives logits for every
position at once (teacher forcing, training, likelihoods); ``start``/``step`` give them one position at
a time from a cache, which is what sampling and arithmetic decoding use. Both paths compute the same
numbers (tests hold them to 1e-5).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class PriorMixin:
    """Needs ``config.grid_shape``, ``config.vocab_size``, ``config.num_classes``,
    ``config.cond_grid_shape`` and ``config.cond_vocab_size``."""

    @property
    def num_tokens(self) -> int:
        return math.prod(self.config.grid_shape)

    def check_inputs(self, codes: torch.Tensor | None, class_labels: torch.Tensor | None,
                     cond: torch.Tensor | None, batch: int | None = None) -> None:
        """Clear errors for inputs that do not fit this prior (wrong tokenizer, missing labels...)."""
        cfg = self.config
        if codes is not None:
            if tuple(codes.shape[1:]) != tuple(cfg.grid_shape):
                raise ValueError(f"this prior models code grids {tuple(cfg.grid_shape)}, got {tuple(codes.shape[1:])}")
            if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= cfg.vocab_size):
                raise ValueError(
                    f"codes out of range [0, {cfg.vocab_size}) (got max {int(codes.max())}): "
                    "they come from a tokenizer with another codebook"
                )
            batch = codes.shape[0]
        if cfg.num_classes:
            if class_labels is None:
                raise ValueError(f"this prior is class-conditional ({cfg.num_classes} classes): pass class_labels")
            if class_labels.shape != (batch,) or int(class_labels.min()) < 0 or int(class_labels.max()) >= cfg.num_classes:
                raise ValueError(f"class_labels must be ({batch},) in [0, {cfg.num_classes}), got {class_labels.tolist()}")
        if cfg.cond_vocab_size:
            if cond is None:
                raise ValueError(f"this prior is conditioned on upper-level codes {tuple(cfg.cond_grid_shape)}: pass cond")
            if tuple(cond.shape[1:]) != tuple(cfg.cond_grid_shape):
                raise ValueError(f"cond must be (B, {tuple(cfg.cond_grid_shape)}), got {tuple(cond.shape)}")

    def nll(self, codes: torch.Tensor, class_labels=None, cond=None) -> torch.Tensor:
        """Negative log-likelihood in nats per sample, (B,)."""
        logits = self(codes, class_labels=class_labels, cond=cond)
        nll = F.cross_entropy(logits.flatten(0, -2).float(), codes.flatten(), reduction="none")
        return nll.view(codes.shape[0], -1).sum(1)
