"""Ancestral sampling from any prior, cached (incremental) or by full recompute.

The cached path calls ``prior.start_state``/``prior.step`` once per position; ``use_cache=False``
runs the whole forward pass for every position, which is slower by a factor of about the sequence
length and exists to verify the cache and to benchmark it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from stage2_prior.base import NULL_CLASS, Prior


@dataclass(frozen=True)
class SamplingOptions:
    """How codes are drawn from a prior's conditionals.

    temperature: logits / T; top_k / top_p: keep the k most likely codes / the smallest set reaching
    probability p (None = all); guidance: classifier-free guidance scale for class-conditional priors
    (1 = none; > 1 needs a prior trained with class dropout); use_cache: incremental steps (False =
    a full forward per position, to check the cache and to benchmark it); static_cache: a fixed-shape cache
    stepped by one CUDA graph per code on a GPU (transformer priors over single codes:
    ``TransformerPrior.start_static``; other priors, whose caches do not grow, step as they always do); None (the
    default) uses it on a CUDA device only (elsewhere it only costs time); the codes drawn are those of the growing
    cache, up to rounding.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    guidance: float = 1.0
    use_cache: bool = True
    static_cache: bool | None = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None for all codes), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (or None), got {self.top_p}")
        if self.static_cache and not self.use_cache:
            raise ValueError("static_cache is a kind of cache: it needs use_cache=True")

    @classmethod
    def of(cls, options: "SamplingOptions | None" = None, **knobs) -> "SamplingOptions":
        """``options`` (default: the defaults) with the given knobs replaced; an unknown knob is an error."""
        names = {f.name for f in fields(cls)}
        unknown = set(knobs) - names
        if unknown:
            raise ValueError(f"unknown sampling options {sorted(unknown)} (known: {sorted(names)})")
        return replace(options or cls(), **knobs)

    def unguided(self) -> "SamplingOptions":
        """The same without guidance (for unconditional levels)."""
        return replace(self, guidance=1.0)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """(B, V) logits -> tempered logits with everything outside top-k / nucleus top-p set to -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _guided_inputs(prior: Prior, class_labels, cond, guidance: float):
    """With guidance, every row is run twice, with its class and with NULL_CLASS (conditional rows first)."""
    if guidance == 1.0:
        return class_labels, cond, 1
    if not prior.config.num_classes:
        raise ValueError(f"guidance {guidance} needs a class-conditional prior; this one is unconditional")
    if not prior.config.null_class:
        raise ValueError(f"guidance {guidance} needs a prior trained with class dropout (train-prior "
                         "'class_dropout' > 0, which gives it a no-class embedding); use guidance 1.0 with this one")
    if class_labels is None:
        raise ValueError("guidance needs class_labels")
    labels = torch.cat([class_labels, torch.full_like(class_labels, NULL_CLASS)])
    return labels, (torch.cat([cond, cond]) if cond is not None else None), 2


def guide(logits: torch.Tensor, guidance: float) -> torch.Tensor:
    """(2B, V) logits, conditional rows then unconditional ones -> (B, V): u + guidance * (c - u).

    Classifier-free guidance: guidance 1 is the conditional model, 0 the unconditional one, and > 1
    sharpens p(class | x) (the implicit classifier) at some cost in diversity.
    """
    cond, uncond = logits.float().chunk(2)
    return uncond + guidance * (cond - uncond)


def _stepper(prior: Prior, rows: int, labels, cond, options: SamplingOptions):
    """prev codes (rows,) or None -> next logits (rows, V), through the cache the options ask for (None: no cache)."""
    if not options.use_cache:
        return None
    static = options.static_cache
    if static is None:
        static = next(prior.parameters()).device.type == "cuda"
    if static and hasattr(prior, "start_static") and not prior.config.depth:
        return prior.start_static(rows, labels, cond).step
    state = prior.start_state(rows, labels, cond)
    return lambda prev: prior.step(state, prev)


@torch.no_grad()
def sample(prior: Prior, batch_size: int, class_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
           options: SamplingOptions | None = None, *, generator: torch.Generator | None = None,
           prefix: torch.Tensor | None = None, progress=None, **knobs) -> torch.Tensor:
    """Codes (B, *grid) drawn position by position; (B, *grid, depth) for a prior over code stacks, stage by stage.

    options (or its fields as keywords, e.g. ``temperature=0.8``): see ``SamplingOptions``.
    prefix: (B, P) known codes in raster order (of ``codes.flatten(1)``, stages fastest; completion): kept as given,
    sampling starts at P.
    progress: optional callable(n) told after each position.
    """
    options = SamplingOptions.of(options, **knobs)
    grid, n = tuple(prior.code_shape), prior.num_tokens
    device = next(prior.parameters()).device
    codes = torch.zeros(batch_size, n, dtype=torch.long, device=device)
    known = 0 if prefix is None else prefix.shape[1]
    if prefix is not None:
        if prefix.shape[0] != batch_size or known > n:
            raise ValueError(f"prefix must be ({batch_size}, <= {n}), got {tuple(prefix.shape)}")
        codes[:, :known] = prefix.to(device)
    labels, cond, copies = _guided_inputs(prior, class_labels, cond, options.guidance)
    rows = batch_size * copies
    step = _stepper(prior, rows, labels, cond, options)
    for t in range(n):
        if step is not None:
            logits = step(codes[:, t - 1].repeat(copies) if t else None)
        elif t >= known:
            logits = prior(codes.repeat(copies, 1).view(rows, *grid), labels, cond).flatten(1, -2)[:, t]
        if t >= known:
            if copies == 2:
                logits = guide(logits, options.guidance)
            probs = filter_logits(logits, options.temperature, options.top_k, options.top_p).softmax(-1)
            codes[:, t] = torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).to(device)
        if progress is not None:
            progress(1)
    return codes.view(batch_size, *grid)
