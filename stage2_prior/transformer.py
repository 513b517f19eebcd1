"""GPT-style decoder prior over a code grid of any rank, in raster order, with a KV cache.

Position t's input is the code at t-1 (a learned start vector at t = 0) plus a positional embedding
of t made as the sum of one embedding per axis, so one class serves 1-D, 2-D and 3-D grids. Class
labels and upper-level codes (embedded, upsampled to this grid) are added to every position's input:
both are known before sampling starts, so causality is untouched.

With ``relative_bias``, every attention logit also gets a learned per-head bias for the offset between
query and key along each axis, (dt, dh, dw) for video (Shaw et al. 2018; T5; Swin's 2-D table). The same
pattern then costs the same anywhere in the grid: a head that looks "one frame back, same place" does so
at every position, which is what a digit moving across the frame needs, and what absolute embeddings
must learn separately at each position from data.

Code stacks (``depth`` > 0: a residual quantizer's codes, (B, *grid, depth)) are modelled as RQ-Transformer does
(Lee et al. 2022): the spatial transformer runs over the positions, its input at t the sum of the embeddings of
the stages at t - 1 (one table per stage); then a small causal depth transformer (``depth_layers`` blocks) runs over
the stages of each position, its input at stage k the spatial output at t plus an embedding of k plus the sum of
the embeddings of the stages < k at t. Stage k of t thus sees every stage before t and the stages < k at t, the
(position, stage) order every prior here keeps (stage2_prior/stacks.py).

Why this and not MusicGen's delay pattern (stage k delayed by k steps, one transformer over N + depth - 1 steps
predicting the stages of a step in parallel), measured by ``python -m benchmarks.stack_priors`` (a 3-stage,
64-code residual VQ-VAE of the digits preset trained 400 steps; 8x8 positions; both priors dim 128, 3 layers,
4 heads, batch 32, the same batches; 1 CPU thread; BENCHMARKS-style results in
benchmarks/results/stack_priors.json):

    prior                 steps   held-out bits/token (all 3 stages)   train step   sampling calls per item
    RQ (this, 0.83 M)       800   3.19                                 230 ms       64 spatial + 192 depth
    delay (0.65 M)          800   3.42                                 117 ms       66
    delay                  1600   3.21 (the same training time as RQ) 117 ms       66

At equal steps RQ codes the held-out tokens in 7% fewer bits; at equal training time the delay pattern only draws
level. RQ's order is also the one the sampler, prefixes (completion, sliding windows) and the arithmetic coder
already step through, one code at a time, so they need nothing new; the delay pattern draws each step's stages
of different positions at once (stage 0 of t does not see stages >= 1 of t - 1), which needs its own stepping and
coding order. Its cost: the depth transformer runs over N x depth tokens, twice the train step here; with many
stages (DAC's 9-12) that cost grows with N x depth where the delay pattern's grows with N + depth, so a GPU speech
config with deep stacks should measure again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from harness.folders import PretrainedMixin
from stage2_prior.base import PriorConfig, PriorMixin, class_embedding
from stage2_prior.stacks import StageEmbedding, code_embedding


BIAS_SCALE = 10.0  # relative attention bias = BIAS_SCALE * its parameter (see attention_bias)
QUERY_BLOCK = 64  # query rows per block of biased_causal_attention


def biased_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q, k, v (B, heads, N, head_dim); bias (heads, N, N) additive, -inf above the diagonal -> (B, heads, N,
    head_dim), in fp32 whatever the autocast, as SDPA's math path computes it.

    Why not SDPA: on a CPU it has no fused kernel for a mask that needs a gradient, and its math path builds the
    whole (N, N) score matrix, half of it masked, and passes over it several times. Here each block of
    ``QUERY_BLOCK`` query rows scores only the keys up to its last row, which skips most of the masked half
    (5/8 of the work at N = 256): the moving-digits prior's train step runs 1.2x (fp32) to 1.3x (bf16) as fast
    (BENCHMARKS.md §18)."""
    dtype, n = q.dtype, q.shape[2]
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, bias = q.float() * q.shape[-1] ** -0.5, k.float(), v.float(), bias.float()
        blocks = []
        for start in range(0, n, QUERY_BLOCK):
            end = min(start + QUERY_BLOCK, n)
            scores = q[:, :, start:end] @ k[:, :, :end].transpose(-1, -2) + bias[:, start:end, :end]
            blocks.append(scores.softmax(-1) @ v[:, :, :end])
        return torch.cat(blocks, dim=2).to(dtype)


@dataclass
class TransformerPriorConfig(PriorConfig):
    dim: int = 256
    num_layers: int = 6
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # on the input embeddings and each residual branch (not inside attention)
    relative_bias: bool = False  # learned per-head attention bias per (query - key) offset along each axis
    depth_layers: int = 1  # code stacks: layers of the depth transformer over the stages of a position

    def __post_init__(self):
        super().__post_init__()
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")
        if self.depth and self.depth_layers < 1:
            raise ValueError(f"depth_layers must be >= 1 for code stacks, got {self.depth_layers}")


class Attention(nn.Module):
    def __init__(self, cfg: TransformerPriorConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, cache: dict | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D). With a cache, x holds the next L positions and keys/values are appended.

        ``bias`` (heads, N, N): additive attention bias, causal mask included (-inf above the diagonal),
        for the whole grid; the rows and columns of the positions involved are taken from it.
        """
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        n = x.shape[1]
        if cache is None:
            # No attention dropout: on CPU it forces SDPA's slow math path (3x slower here).
            if bias is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif x.device.type == "cpu":
                out = biased_causal_attention(q, k, v, bias[:, :n, :n])
            else:  # a GPU's fused kernels take the mask and its gradient
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, :n, :n].to(q.dtype))
        else:
            pos = cache["pos"]
            cache["k"][:, :, pos : pos + n], cache["v"][:, :, pos : pos + n] = k, v
            k, v = cache["k"][:, :, : pos + n], cache["v"][:, :, : pos + n]
            if bias is not None:
                mask = bias[:, pos : pos + n, : pos + n].to(q.dtype)
            else:  # single-position steps attend to everything cached; chunks need the causal mask
                mask = None if n == 1 else torch.ones(n, pos + n, dtype=torch.bool, device=x.device).tril(pos)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))

    def static_step(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, t: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
        """One position with a full-length cache: x (B, 1, D); keys, values (B, heads, N, head_dim), written at
        ``t`` (a (1,) long tensor) in place; mask (1 or heads, 1, N) additive, -inf at the keys not yet drawn."""
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        keys.index_copy_(2, t, k.to(keys.dtype))
        values.index_copy_(2, t, v.to(values.dtype))
        out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask.to(q.dtype))
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class Block(nn.Module):
    def __init__(self, cfg: TransformerPriorConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: dict | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), cache, bias))
        return x + self.drop(self.mlp(self.ln2(x)))

    def static_step(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, t: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
        """``forward`` for one position against a full-length cache (``Attention.static_step``); eval only."""
        x = x + self.attn.static_step(self.ln1(x), keys, values, t, mask)
        return x + self.mlp(self.ln2(x))


class DepthTransformer(nn.Module):
    """RQ-Transformer's depth part: a small causal transformer over the stages of one position. Its input at stage k
    is the spatial transformer's output h at that position, plus a learned embedding of k, plus the sum of the
    embeddings of the stages < k there (what a residual quantizer has reconstructed so far)."""

    def __init__(self, cfg: TransformerPriorConfig):
        super().__init__()
        self.pos = nn.Embedding(cfg.depth, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth_layers))
        self.ln = nn.LayerNorm(cfg.dim)

    def inputs(self, h: torch.Tensor, stages: torch.Tensor) -> torch.Tensor:
        """h (B, N, D) and the stages' embeddings (B, N, depth, D) -> inputs (B, N, depth, D)."""
        before = F.pad(stages.cumsum(2)[:, :, :-1], (0, 0, 1, 0))  # stage k: the sum over stages < k
        return h[:, :, None] + self.pos.weight + before

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u (M, depth, D) -> (M, depth, D), stage k seeing inputs <= k."""
        for block in self.blocks:
            u = block(u)
        return self.ln(u)

    def step(self, u: torch.Tensor, caches: list[dict], k: int) -> torch.Tensor:
        """u (B, D), the input at stage k -> (B, D); keys and values of stages < k come from ``caches``."""
        x = u[:, None]
        for block, cache in zip(self.blocks, caches):
            cache["pos"] = k
            x = block(x, cache)
        return self.ln(x)[:, 0]


@dataclass
class TransformerState:
    """Sampling state: per-layer KV caches and the next code to predict (stages count: position = pos // depth).

    Code stacks add the spatial output at the current position (``h``), the embeddings of its stages drawn so far
    (``stages``) and the depth transformer's KV caches (``depth_caches``)."""

    caches: list[dict]
    context: torch.Tensor  # (B, N, D) class + upper-level conditioning + positions, for every position
    bias: torch.Tensor | None = None  # (heads, N, N) relative attention bias with the causal mask
    pos: int = 0
    h: torch.Tensor | None = None  # (B, D)
    stages: list[torch.Tensor] = field(default_factory=list)  # per stage drawn at this position, (B, D)
    depth_caches: list[dict] = field(default_factory=list)


class TransformerPrior(PriorMixin, PretrainedMixin, nn.Module):
    """GPT-style prior over a code grid of any rank, and over code stacks with a depth transformer (see the module
    docstring)."""

    config_class = TransformerPriorConfig
    model_type = "transformer"
    legacy_model_types = ("transformer_prior",)

    def __init__(self, config: TransformerPriorConfig):
        super().__init__()
        self.config = config
        d = config.dim
        # a stack's stages each have their own codebook: one table per stage (stacks.StageEmbedding)
        self.tok_emb = StageEmbedding(config.vocab_size, d, config.depth) if config.depth else nn.Embedding(
            config.vocab_size, d)
        self.start = nn.Parameter(torch.zeros(d))
        self.pos_emb = nn.ModuleList(nn.Embedding(n, d) for n in config.grid_shape)
        if config.relative_bias:  # one entry per offset combination, (2n - 1) offsets along an axis of n
            offsets = math.prod(2 * n - 1 for n in config.grid_shape)
            self.rel_bias = nn.Parameter(torch.zeros(config.num_heads, offsets))
            self.register_buffer("rel_index", _relative_index(config.grid_shape), persistent=False)
        self.class_emb = class_embedding(config, d)
        self.cond_emb = (code_embedding(config.cond_vocab_size, d, config.cond_depth) if config.cond_vocab_size
                         else None)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(d)
        if config.depth:
            self.stack = DepthTransformer(config)
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

    def attention_bias(self) -> torch.Tensor | None:
        """(heads, N, N): the learned bias for each (query, key) pair's offset, -inf where key > query."""
        if not self.config.relative_bias:
            return None
        n = self.num_positions
        causal = torch.ones(n, n, dtype=torch.bool, device=self.rel_bias.device).tril()
        # Adam moves a parameter by about lr per step, and a useful bias is several logits: the table is
        # stored at 1 / BIAS_SCALE, which is an lr BIAS_SCALE times larger for it alone.
        return (self.rel_bias * BIAS_SCALE)[:, self.rel_index].masked_fill(~causal, float("-inf"))

    def context(self, batch: int, class_labels=None, cond=None) -> torch.Tensor:
        """(B, N, D): what each position's input gets besides the previous token."""
        ctx = self.positions()[None].expand(batch, -1, -1)
        if self.class_emb is not None:
            ctx = ctx + self.embed_class(class_labels)[:, None]
        if self.cond_emb is not None:
            up = F.interpolate(self.cond_emb(cond).movedim(-1, 1), size=tuple(self.config.grid_shape), mode="nearest")
            ctx = ctx + up.flatten(2).transpose(1, 2)
        return ctx

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs (B, N, D) -> the spatial transformer's outputs (B, N, D), before the final norm."""
        bias = self.attention_bias()
        for block in self.blocks:
            x = block(x, bias=bias)
        return x

    def forward(self, codes: torch.Tensor, class_labels=None, cond=None) -> torch.Tensor:
        """codes (B, *grid) -> logits (B, *grid, V); position t sees codes before t only. Stacks: codes
        (B, *grid, depth) -> logits (B, *grid, depth, V); stage k of position t sees every stage of the positions
        before t and the stages < k at t."""
        self.check_inputs(codes, class_labels, cond)
        if self.config.depth:
            return self._forward_stacks(codes, class_labels, cond)
        b = codes.shape[0]
        prev = self.tok_emb(codes.flatten(1)[:, :-1])
        x = self.drop(torch.cat([self.start.expand(b, 1, -1), prev], dim=1) + self.context(b, class_labels, cond))
        return self.head(self.ln_f(self._spatial(x))).view(*codes.shape, -1)

    def _forward_stacks(self, codes: torch.Tensor, class_labels, cond) -> torch.Tensor:
        b = codes.shape[0]
        stages = self.tok_emb(codes.flatten(1, -2))  # (B, N, depth, D)
        # position t's input: the sum of the stages' embeddings at t - 1 (what the quantizer's decoder sees)
        prev = torch.cat([self.start.expand(b, 1, -1), stages[:, :-1].sum(2)], dim=1)
        h = self.ln_f(self._spatial(self.drop(prev + self.context(b, class_labels, cond))))
        u = self.drop(self.stack.inputs(h, stages)).flatten(0, 1)  # (B * N, depth, D)
        return self.head(self.stack(u)).view(*codes.shape, -1)

    # ---- incremental (cached) computation -----------------------------------------------------
    def start_state(self, batch: int, class_labels=None, cond=None) -> TransformerState:
        self.check_inputs(None, class_labels, cond, batch=batch)
        cfg, n = self.config, self.num_positions
        head_dim = cfg.dim // cfg.num_heads
        p = self.start

        def caches(layers: int, length: int) -> list[dict]:
            return [{"k": p.new_zeros(batch, cfg.num_heads, length, head_dim),
                     "v": p.new_zeros(batch, cfg.num_heads, length, head_dim), "pos": 0} for _ in range(layers)]

        state = TransformerState(caches(cfg.num_layers, n), self.context(batch, class_labels, cond),
                                 self.attention_bias())
        if cfg.depth:
            state.depth_caches = caches(cfg.depth_layers, cfg.depth)
        return state

    def start_static(self, batch: int, class_labels=None, cond=None, graph: bool | None = None) -> StaticStep:
        """A fixed-shape stepper (``StaticStep``: a CUDA graph per code on a GPU); its ``step(prev)`` gives what
        ``step(state, prev)`` gives."""
        return StaticStep(self, batch, class_labels, cond, graph)

    def _spatial_step(self, state: TransformerState, x: torch.Tensor, t: int) -> torch.Tensor:
        """x (B, D), the input at position t (the start vector or the codes at t - 1 embedded) -> (B, 1, D)."""
        x = (x + state.context[:, t])[:, None]
        for block, cache in zip(self.blocks, state.caches):
            cache["pos"] = t
            x = block(x, cache, state.bias)
        return x

    def step(self, state: TransformerState, prev: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, V) for code ``state.pos``; ``prev`` (B,) is the code before (None at 0). Stacks: the codes
        are (position, stage) in raster order, stages fastest."""
        if state.pos >= self.num_tokens:
            raise IndexError(f"all {self.num_tokens} codes are done")
        if self.config.depth:
            return self._step_stacks(state, prev)
        t = state.pos
        b = state.context.shape[0]
        x = self.start.expand(b, -1) if t == 0 else self.tok_emb(prev)
        x = self._spatial_step(state, x, t)
        state.pos = t + 1
        return self.head(self.ln_f(x))[:, 0]

    def _step_stacks(self, state: TransformerState, prev: torch.Tensor | None) -> torch.Tensor:
        depth = self.config.depth
        t, k = divmod(state.pos, depth)
        if state.pos and prev is None:
            raise ValueError(f"prev (the code before code {state.pos}) is required after code 0")
        if state.pos:  # prev is stage (k - 1) of position t, or the last stage of t - 1
            state.stages.append(self.tok_emb.stage(prev, (k - 1) % depth))
        if k == 0:  # a new position: one spatial step from the stages of the one before
            b = state.context.shape[0]
            x = self.start.expand(b, -1) if t == 0 else torch.stack(state.stages, 1).sum(1)
            state.h, state.stages = self.ln_f(self._spatial_step(state, x, t))[:, 0], []
        before = sum(state.stages) if state.stages else 0  # as DepthTransformer.inputs: the sum over stages < k
        u = state.h + self.stack.pos.weight[k] + before
        state.pos += 1
        return self.head(self.stack.step(u, state.depth_caches, k))


class StaticStep:
    """The cached step with every shape fixed, so that a GPU can replay it as one CUDA graph per code.

    ``TransformerPrior.step`` grows each layer's keys and values by a position per call: every call has new shapes
    and launches its few dozen kernels one by one from Python, so on a GPU a step costs the CPU's launch time, not
    the GPU's work. Here the caches have the grid's full length, the position is a tensor, the new key and value
    are written with ``index_copy_`` and attention reads the whole cache under a mask that hides the positions not
    yet drawn (so a step costs what the last step of the growing cache costs). On CUDA (``graph`` None or True) the
    step is captured once as a CUDA graph, under the autocast that is active when this is built, and each call
    replays it. Elsewhere the same fixed-shape step runs eagerly, which is what lets a CPU test check it against
    ``step``. Single codes only (not code stacks); the prior must be in eval mode.
    """

    def __init__(self, prior: "TransformerPrior", batch: int, class_labels=None, cond=None,
                 graph: bool | None = None):
        if prior.config.depth:
            raise ValueError("the static cache is for priors over single codes; a code-stack prior (depth > 0) "
                             "samples with the growing cache")
        if prior.training:
            raise ValueError("the static cache is for sampling: call prior.eval() first")
        cfg, p = prior.config, prior.start
        device = p.device
        self.prior, self.num_tokens, self.pos = prior, prior.num_positions, 0
        self.autocast_dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                               else None)
        state = prior.start_state(batch, class_labels, cond)  # checks the inputs; context and bias as ``step``'s
        self.context = state.context  # (B, N, D), maybe a broadcast view: index_select reads it as it is
        # additive mask rows: the relative bias with its causal -inf, or -inf at keys after the query
        self.bias = state.bias if state.bias is not None else torch.zeros(
            1, self.num_tokens, self.num_tokens, device=device).masked_fill(
            ~torch.ones(self.num_tokens, self.num_tokens, dtype=torch.bool, device=device).tril(), float("-inf"))
        shape = (cfg.num_layers, batch, cfg.num_heads, self.num_tokens, cfg.dim // cfg.num_heads)
        self.keys = torch.zeros(shape, dtype=self.autocast_dtype or p.dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.prev = torch.zeros(batch, dtype=torch.long, device=device)  # the code before position t
        self.t = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None
        if (device.type == "cuda") if graph is None else graph:
            self._capture()

    def _run(self) -> torch.Tensor:
        """The step at ``self.t`` from ``self.prev`` -> logits (B, V); writes position t of the caches."""
        prior, t = self.prior, self.t
        x = torch.where(t == 0, prior.start, prior.tok_emb(self.prev))  # (B, D): the start vector at t = 0
        x = (x + self.context.index_select(1, t)[:, 0])[:, None]
        mask = self.bias.index_select(1, t)[None]  # (1, heads or 1, 1, N)
        for i, block in enumerate(prior.blocks):
            x = block.static_step(x, self.keys[i], self.values[i], t, mask)
        return prior.head(prior.ln_f(x))[:, 0]

    def _autocast(self):
        # a graph may not keep autocast's cast cache (it would hold tensors freed after the capture)
        device = self.keys.device.type
        if self.autocast_dtype is None:
            return torch.autocast(device, enabled=False)
        return torch.autocast(device, dtype=self.autocast_dtype, cache_enabled=False)

    @torch.no_grad()
    def _capture(self) -> None:
        """Warm up on a side stream (as torch.cuda.graph asks), then capture ``_run`` into ``self.graph``."""
        side = torch.cuda.Stream(self.keys.device)
        side.wait_stream(torch.cuda.current_stream(self.keys.device))
        with torch.cuda.stream(side), self._autocast():
            for _ in range(3):
                self._run()
        torch.cuda.current_stream(self.keys.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with self._autocast(), torch.cuda.graph(self.graph):
            self.logits = self._run()
        self.keys.zero_()
        self.values.zero_()

    @torch.no_grad()
    def step(self, prev: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, V) for the next code, as ``TransformerPrior.step``; ``prev`` (B,) is the code before (None
        at 0)."""
        if self.pos >= self.num_tokens:
            raise IndexError(f"all {self.num_tokens} codes are done")
        if self.pos and prev is None:
            raise ValueError(f"prev (the code before code {self.pos}) is required after code 0")
        self.t.fill_(self.pos)
        if prev is not None:
            self.prev.copy_(prev)
        self.pos += 1
        if self.graph is None:
            with self._autocast():
                return self._run()
        self.graph.replay()
        return self.logits.clone()  # the graph's output buffer is overwritten by the next replay


def _relative_index(grid_shape: tuple[int, ...]) -> torch.Tensor:
    """(N, N) long: for raster positions q and k, the index of their offset (q - k per axis) in a table of
    prod(2 n - 1) entries (mixed radix, offsets shifted to be >= 0)."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid_shape), indexing="ij")).flatten(1)  # (A, N)
    diff = coords[:, :, None] - coords[:, None, :]  # (A, N, N) in (-n, n)
    index = torch.zeros(diff.shape[1:], dtype=torch.long)
    for axis, n in enumerate(grid_shape):
        index = index * (2 * n - 1) + diff[axis] + n - 1
    return index
