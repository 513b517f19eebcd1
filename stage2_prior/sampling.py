"""Ancestral sampling from any prior, cached (incremental) or by full recompute.

The cached path calls ``prior.start_state``/``prior.step`` once per position; ``use_cache=False``
runs the whole forward pass for every position, which is slower by a factor of about the sequence
length and exists to verify the cache and to benchmark it.
"""
from __future__ import annotations

import torch


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


@torch.no_grad()
def sample(prior, batch_size: int, class_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None, use_cache: bool = True,
           prefix: torch.Tensor | None = None, progress=None) -> torch.Tensor:
    """Codes (B, *grid) drawn position by position.

    prefix: (B, P) known codes in raster order (completion): kept as given, sampling starts at P.
    progress: optional callable(n) told after each position.
    """
    grid, n = tuple(prior.config.grid_shape), prior.num_tokens
    device = next(prior.parameters()).device
    codes = torch.zeros(batch_size, n, dtype=torch.long, device=device)
    known = 0 if prefix is None else prefix.shape[1]
    if prefix is not None:
        if prefix.shape[0] != batch_size or known > n:
            raise ValueError(f"prefix must be ({batch_size}, <= {n}), got {tuple(prefix.shape)}")
        codes[:, :known] = prefix.to(device)
    state = prior.start_state(batch_size, class_labels, cond) if use_cache else None
    for t in range(n):
        if use_cache:
            logits = prior.step(state, codes[:, t - 1] if t else None)
        elif t >= known:
            logits = prior(codes.view(batch_size, *grid), class_labels, cond).flatten(1, -2)[:, t]
        if t >= known:
            probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            codes[:, t] = torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).to(device)
        if progress is not None:
            progress(1)
    return codes.view(batch_size, *grid)
