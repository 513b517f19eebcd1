"""What every prior shares: the interface the sampler, the pipeline and the coder rely on.

A prior models codes (B, *grid) in raster order (last axis fastest). ``forward`` gives logits for every
position at once (teacher forcing, training, likelihoods); ``start``/``step`` give them one position at
a time from a cache, which is what sampling and arithmetic decoding use. Both paths compute the same
numbers (tests hold them to 1e-5).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

# The class label that means "no class". A prior with ``config.null_class`` has one more class embedding,
# learned from labels dropped at random in training (``class_dropout``), so it is a conditional and an
# unconditional model at once: what classifier-free guidance needs (Ho & Salimans 2022).
NULL_CLASS = -1


def class_embedding(config, dim: int) -> nn.Embedding | None:
    """The class embedding of a prior: ``num_classes`` rows, plus one for NULL_CLASS with ``null_class``."""
    if config.null_class and not config.num_classes:
        raise ValueError("null_class needs a class-conditional prior (num_classes > 0)")
    return nn.Embedding(config.num_classes + int(config.null_class), dim) if config.num_classes else None


class PriorMixin:
    """Needs ``config.grid_shape``, ``config.vocab_size``, ``config.num_classes``, ``config.null_class``,
    ``config.cond_grid_shape`` and ``config.cond_vocab_size``, and ``self.class_emb`` from
    ``class_embedding``."""

    shape_agnostic = False  # True when no weight depends on the grid size (convolutional priors)

    def with_grid(self, grid_shape: tuple[int, ...], cond_grid_shape: tuple[int, ...] | None = None):
        """The same weights for another grid size: a conv prior trained on crops samples whole images."""
        grid_shape = tuple(grid_shape)
        cond_grid_shape = tuple(cond_grid_shape) if cond_grid_shape is not None else None
        if grid_shape == tuple(self.config.grid_shape) and cond_grid_shape == (
                tuple(self.config.cond_grid_shape) if self.config.cond_grid_shape else None):
            return self
        if not self.shape_agnostic:
            raise ValueError(f"a {self.model_type} has weights for {tuple(self.config.grid_shape)} grids and cannot "
                             f"model {grid_shape}: train it at that size, or use a convolutional prior")
        device = next(self.parameters()).device
        resized = type(self)(replace(self.config, grid_shape=grid_shape, cond_grid_shape=cond_grid_shape))
        resized.load_state_dict(self.state_dict(), strict=True)
        return resized.to(device).train(self.training)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.config.grid_shape)

    def embed_class(self, class_labels: torch.Tensor) -> torch.Tensor:
        """(B,) labels in [0, num_classes), or NULL_CLASS with ``null_class`` -> (B, D)."""
        return self.class_emb(class_labels.masked_fill(class_labels == NULL_CLASS, self.config.num_classes))

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
            low = NULL_CLASS if cfg.null_class else 0
            if class_labels.shape != (batch,) or int(class_labels.min()) < low or int(class_labels.max()) >= cfg.num_classes:
                null = f", or {NULL_CLASS} for no class" if cfg.null_class else ""
                raise ValueError(f"class_labels must be ({batch},) in [0, {cfg.num_classes}){null}, "
                                 f"got {class_labels.tolist()}")
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
