"""GPT-style decoder prior over a code grid of any rank, in raster order, with a KV cache.

Position t's input is the code at t-1 (a learned start vector at t = 0) plus a positional embedding
of t made as the sum of one embedding per axis, so one class serves 1-D, 2-D and 3-D grids. Class
labels and upper-level codes (embedded, upsampled to this grid) are added to every position's input:
both are known before sampling starts, so causality is untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from pipelines.hub import PretrainedMixin
from stage2_prior.base import PriorMixin


@dataclass
class TransformerPriorConfig:
    grid_shape: tuple[int, ...] = (8, 8)
    vocab_size: int = 512
    num_classes: int = 0  # 0 = unconditional
    cond_grid_shape: tuple[int, ...] | None = None  # upper-level code grid (hierarchies)
    cond_vocab_size: int = 0  # 0 = no upper-level conditioning
    dim: int = 256
    num_layers: int = 6
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # on the input embeddings and each residual branch (not inside attention)

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")


class Attention(nn.Module):
    def __init__(self, cfg: TransformerPriorConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """x (B, L, D). With a cache, x holds the next L positions and keys/values are appended."""
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        if cache is None:
            # No attention dropout: on CPU it forces SDPA's slow math path (3x slower here).
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            pos, n = cache["pos"], x.shape[1]
            cache["k"][:, :, pos : pos + n], cache["v"][:, :, pos : pos + n] = k, v
            k, v = cache["k"][:, :, : pos + n], cache["v"][:, :, : pos + n]
            # Single-position steps attend to everything cached; chunks need the causal mask.
            mask = None if n == 1 else torch.ones(n, pos + n, dtype=torch.bool, device=x.device).tril(pos)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class Block(nn.Module):
    def __init__(self, cfg: TransformerPriorConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), cache))
        return x + self.drop(self.mlp(self.ln2(x)))


@dataclass
class TransformerState:
    """Sampling state: per-layer KV caches and the next position to predict."""

    caches: list[dict]
    context: torch.Tensor  # (B, N, D) class + upper-level conditioning + positions, for every position
    pos: int = 0


class TransformerPrior(PriorMixin, PretrainedMixin, nn.Module):
    config_class = TransformerPriorConfig
    model_type = "transformer_prior"

    def __init__(self, config: TransformerPriorConfig):
        super().__init__()
        self.config = config
        d = config.dim
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.start = nn.Parameter(torch.zeros(d))
        self.pos_emb = nn.ModuleList(nn.Embedding(n, d) for n in config.grid_shape)
        self.class_emb = nn.Embedding(config.num_classes, d) if config.num_classes else None
        self.cond_emb = nn.Embedding(config.cond_vocab_size, d) if config.cond_vocab_size else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def positions(self) -> torch.Tensor:
        """(N, D): the sum of per-axis embeddings at every raster position."""
        grids = torch.meshgrid(*(torch.arange(n, device=self.start.device) for n in self.config.grid_shape),
                               indexing="ij")
        return sum(emb(g.flatten()) for emb, g in zip(self.pos_emb, grids))

    def context(self, batch: int, class_labels=None, cond=None) -> torch.Tensor:
        """(B, N, D): what each position's input gets besides the previous token."""
        ctx = self.positions()[None].expand(batch, -1, -1)
        if self.class_emb is not None:
            ctx = ctx + self.class_emb(class_labels)[:, None]
        if self.cond_emb is not None:
            up = F.interpolate(self.cond_emb(cond).movedim(-1, 1), size=tuple(self.config.grid_shape), mode="nearest")
            ctx = ctx + up.flatten(2).transpose(1, 2)
        return ctx

    def forward(self, codes: torch.Tensor, class_labels=None, cond=None) -> torch.Tensor:
        """codes (B, *grid) -> logits (B, *grid, V); position t sees codes before t only."""
        self.check_inputs(codes, class_labels, cond)
        b = codes.shape[0]
        prev = self.tok_emb(codes.flatten(1)[:, :-1])
        x = self.drop(torch.cat([self.start.expand(b, 1, -1), prev], dim=1) + self.context(b, class_labels, cond))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)).view(*codes.shape, -1)

    # ---- incremental (cached) computation -----------------------------------------------------
    def start_state(self, batch: int, class_labels=None, cond=None) -> TransformerState:
        self.check_inputs(None, class_labels, cond, batch=batch)
        cfg, n = self.config, self.num_tokens
        head_dim = cfg.dim // cfg.num_heads
        p = self.start
        caches = [{"k": p.new_zeros(batch, cfg.num_heads, n, head_dim),
                   "v": p.new_zeros(batch, cfg.num_heads, n, head_dim), "pos": 0} for _ in self.blocks]
        return TransformerState(caches, self.context(batch, class_labels, cond))

    def step(self, state: TransformerState, prev: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, V) for position ``state.pos``; ``prev`` (B,) is the code at pos - 1 (None at 0)."""
        t = state.pos
        if t >= self.num_tokens:
            raise IndexError(f"all {self.num_tokens} positions are done")
        b = state.context.shape[0]
        x = self.start.expand(b, -1) if t == 0 else self.tok_emb(prev)
        x = (x + state.context[:, t])[:, None]
        for block, cache in zip(self.blocks, state.caches):
            cache["pos"] = t
            x = block(x, cache)
        state.pos = t + 1
        return self.head(self.ln_f(x))[:, 0]
