"""What every prior shares: its config fields, the interface the sampler, the pipeline and the coder rely on,
and the checks of what it is given.

A prior models codes (B, *grid) in raster order (last axis fastest). ``forward`` gives logits for every
position at once (teacher forcing, training, likelihoods); ``start_state``/``step`` give them one position at
a time from a cache, which is what sampling and arithmetic decoding use. Both paths compute the same
numbers (tests hold them to 1e-5).

A prior over code stacks (``depth`` > 0: a residual quantizer's codes, (B, *grid, depth)) models them in the
same raster order with the stages as the last, fastest axis (:mod:`stage2_prior.stacks`): ``forward`` gives
(B, *grid, depth, V) and ``step`` one stage of one position at a time; ``code_shape`` and ``num_tokens`` count
the stages, so every user of the interface handles stacks as it handles grids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from stage2_prior.stacks import code_shape

# The class label that means "no class". A prior with ``config.null_class`` has one more class embedding,
# learned from labels dropped at random in training (``class_dropout``), so it is a conditional and an
# unconditional model at once: what classifier-free guidance needs (Ho & Salimans 2022).
NULL_CLASS = -1


@dataclass
class PriorConfig:
    """The fields every prior config has: what it models and what it is conditioned on. ``tokgen train-prior``
    fills them from the token manifest; each architecture's config adds its network's size."""

    grid_shape: tuple[int, ...] = (8, 8)
    vocab_size: int = 512
    num_classes: int = 0  # 0 = unconditional
    null_class: bool = False  # one more class embedding, for NULL_CLASS (classifier-free guidance)
    cond_grid_shape: tuple[int, ...] | None = None  # upper-level code grid (hierarchies)
    cond_vocab_size: int = 0  # 0 = no upper-level conditioning
    depth: int = 0  # stages per position of code stacks (B, *grid, depth), a residual quantizer's; 0 = none
    cond_depth: int = 0  # the same for the upper-level codes

    def __post_init__(self):
        self.grid_shape = tuple(self.grid_shape)
        if self.cond_grid_shape is not None:
            self.cond_grid_shape = tuple(self.cond_grid_shape)
        if self.null_class and not self.num_classes:
            raise ValueError("null_class needs a class-conditional prior (num_classes > 0)")
        if self.depth < 0 or self.cond_depth < 0:
            raise ValueError(f"depth and cond_depth must be >= 0 (0 = no stacks), got {self.depth}, {self.cond_depth}")
        if self.cond_depth and not self.cond_vocab_size:
            raise ValueError("cond_depth needs upper-level conditioning (cond_vocab_size > 0)")

    @property
    def conditional(self) -> bool:
        return bool(self.num_classes or self.cond_vocab_size)


class Prior(Protocol):
    """The interface of every prior, as the sampler, the pipeline and the coder use it."""

    config: PriorConfig
    model_type: str
    shape_agnostic: bool  # True when no weight depends on the grid size (convolutional priors)

    @property
    def num_positions(self) -> int:
        """Positions of the grid (each holds one code, or a stack of ``depth``)."""

    @property
    def num_tokens(self) -> int:
        """Codes per sample, every stage of a stack counted: the steps of sampling and coding."""

    @property
    def code_shape(self) -> tuple[int, ...]:
        """One sample's codes: (*grid), or (*grid, depth) for stacks."""

    def __call__(self, codes: torch.Tensor, class_labels: torch.Tensor | None = None,
                 cond: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, *code_shape) -> logits (B, *code_shape, V); code t (raster order, stages fastest) sees codes
        before t only."""

    def start_state(self, batch: int, class_labels: torch.Tensor | None = None,
                    cond: torch.Tensor | None = None) -> Any:
        """The cache for sampling or coding ``batch`` rows from position 0."""

    def step(self, state: Any, prev: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, V) for the next code (of ``codes.flatten(1)``); ``prev`` (B,) is the code before (None at 0)."""

    def nll(self, codes: torch.Tensor, class_labels: torch.Tensor | None = None,
            cond: torch.Tensor | None = None) -> torch.Tensor:
        """Negative log-likelihood in nats per sample, (B,)."""

    def with_grid(self, grid_shape: tuple[int, ...], cond_grid_shape: tuple[int, ...] | None = None) -> "Prior": ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


def check_class_labels(labels, batch: int, num_classes: int, *, null_class: bool = False, who: str = "this prior",
                       expand: bool = True) -> torch.Tensor | None:
    """``labels`` as a (batch,) LongTensor in [0, num_classes) (or NULL_CLASS with ``null_class``), or None for
    an unconditional model; a clear ValueError otherwise. With ``expand`` one label serves the whole batch."""
    if not num_classes:
        if labels is not None:
            raise ValueError(f"{who} is unconditional: do not pass class_labels")
        return None
    if labels is None:
        raise ValueError(f"{who} is class-conditional ({num_classes} classes): pass class_labels")
    labels = torch.as_tensor(labels, dtype=torch.long)
    if expand and labels.numel() == 1:
        labels = labels.reshape(1).expand(batch)
    if labels.shape != (batch,):
        raise ValueError(f"got {labels.numel()} class labels for a batch of {batch}: class_labels must be ({batch},)")
    low = NULL_CLASS if null_class else 0
    if batch and (int(labels.min()) < low or int(labels.max()) >= num_classes):
        null = f", or {NULL_CLASS} for no class" if null_class else ""
        raise ValueError(f"class_labels must lie in [0, {num_classes}){null}, got {labels.tolist()}")
    return labels


def walk_levels(priors: list, codes: list[torch.Tensor], labels: torch.Tensor | None):
    """(level, prior, cond, labels for that prior) for every level, top first: ``cond`` is the level above's
    codes (``codes[level - 1]``, None at the top), so ``codes`` may be filled while the walk goes on (sampling)."""
    for level, prior in enumerate(priors):
        yield level, prior, (codes[level - 1] if level else None), (labels if prior.config.num_classes else None)


def class_embedding(config: PriorConfig, dim: int) -> nn.Embedding | None:
    """The class embedding of a prior: ``num_classes`` rows, plus one for NULL_CLASS with ``null_class``."""
    return nn.Embedding(config.num_classes + int(config.null_class), dim) if config.num_classes else None


class PriorMixin:
    """The shared implementation: checks, class embedding lookup, NLL and resizing. Needs ``self.config``
    (a PriorConfig) and ``self.class_emb`` from ``class_embedding``."""

    shape_agnostic = False  # True when no weight depends on the grid size (convolutional priors)

    def with_grid(self, grid_shape: tuple[int, ...], cond_grid_shape: tuple[int, ...] | None = None):
        """The same weights for another grid size: a conv prior trained on crops samples whole images."""
        grid_shape = tuple(grid_shape)
        cond_grid_shape = tuple(cond_grid_shape) if cond_grid_shape is not None else None
        if grid_shape == tuple(self.config.grid_shape) and cond_grid_shape == self.config.cond_grid_shape:
            return self
        if not self.shape_agnostic:
            raise ValueError(f"a {self.model_type} prior has weights for {tuple(self.config.grid_shape)} grids and "
                             f"cannot model {grid_shape}: train it at that size, or use a convolutional prior")
        device = next(self.parameters()).device
        resized = type(self)(replace(self.config, grid_shape=grid_shape, cond_grid_shape=cond_grid_shape))
        resized.load_state_dict(self.state_dict(), strict=True)
        return resized.to(device).train(self.training)

    @property
    def code_shape(self) -> tuple[int, ...]:
        """One sample's codes: the grid, plus the stages last for stacks."""
        return code_shape(self.config.grid_shape, self.config.depth)

    @property
    def cond_code_shape(self) -> tuple[int, ...] | None:
        """One sample's upper-level codes (None without a level above)."""
        cfg = self.config
        return code_shape(cfg.cond_grid_shape, cfg.cond_depth) if cfg.cond_grid_shape is not None else None

    @property
    def num_positions(self) -> int:
        """Positions of the grid (each holds one code, or a stack of ``depth``)."""
        return math.prod(self.config.grid_shape)

    @property
    def num_tokens(self) -> int:
        """Codes per sample, every stage of a stack counted: the steps of sampling and arithmetic coding, and what
        bits per token divide by."""
        return math.prod(self.code_shape)

    def embed_class(self, class_labels: torch.Tensor) -> torch.Tensor:
        """(B,) labels in [0, num_classes), or NULL_CLASS with ``null_class`` -> (B, D)."""
        return self.class_emb(class_labels.masked_fill(class_labels == NULL_CLASS, self.config.num_classes))

    def check_inputs(self, codes: torch.Tensor | None, class_labels: torch.Tensor | None,
                     cond: torch.Tensor | None, batch: int | None = None) -> None:
        """Clear errors for inputs that do not fit this prior (wrong tokenizer, missing labels...)."""
        cfg = self.config
        if codes is not None:
            if tuple(codes.shape[1:]) != self.code_shape:
                what = "code grids" if not cfg.depth else f"code stacks (*grid, stages) of depth {cfg.depth}:"
                raise ValueError(f"this prior models {what} {self.code_shape}, got {tuple(codes.shape[1:])}")
            if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= cfg.vocab_size):
                raise ValueError(
                    f"codes out of range [0, {cfg.vocab_size}) (got max {int(codes.max())}): "
                    "they come from a tokenizer with another codebook"
                )
            batch = codes.shape[0]
        check_class_labels(class_labels, batch, cfg.num_classes, null_class=cfg.null_class, expand=False)
        if cfg.cond_vocab_size:
            if cond is None:
                raise ValueError(f"this prior is conditioned on upper-level codes {tuple(cfg.cond_grid_shape)}: pass cond")
            if tuple(cond.shape[1:]) != self.cond_code_shape:
                raise ValueError(f"cond must be (B, {self.cond_code_shape}), got {tuple(cond.shape)}")

    def nll(self, codes: torch.Tensor, class_labels=None, cond=None) -> torch.Tensor:
        """Negative log-likelihood in nats per sample, (B,)."""
        logits = self(codes, class_labels=class_labels, cond=cond)
        nll = F.cross_entropy(logits.flatten(0, -2).float(), codes.flatten(), reduction="none")
        return nll.view(codes.shape[0], -1).sum(1)
