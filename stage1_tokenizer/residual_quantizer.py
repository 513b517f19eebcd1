"""Residual vector quantization (RVQ: SoundStream, EnCodec, DAC; RQ-VAE for images).

``num_stages`` vector quantizers (quantizer.py, each with its EMA codebook, dead-code restarts, k-means init and
optional factorised l2-normalised lookups through ``code_dim`` + ``cosine``, as DAC uses) quantize in turn what the
stages before them left: stage 0 quantizes z, stage i the residual z - (z_q of stages < i). The decoder sees the sum.
Codes carry a depth axis, last: (B, *S, stages). Any prefix of the stages decodes (coarser), so one model serves
several bitrates: ``encode(z, num_stages=k)`` gives k stages and ``lookup`` takes codes of any depth 1..num_stages.

Quantizer dropout (SoundStream): in training, a share ``quantizer_dropout`` of the batches uses only the first k
stages, k uniform in 1..num_stages, so the first stages learn to stand alone. k is drawn per batch and must be the
same on every rank: the stages skipped run no forward, so their EMA all-reduces would otherwise not match up. It
comes from a generator seeded by a saved seed (drawn at construction, which a seeded training script does
identically on every rank) and a saved draw counter, so every rank draws the same k with no communication, and a
resumed run continues the same sequence. Both live in buffers (saved with the model) and in host copies (read from
the buffers once, after construction or a load), so a draw never reads a GPU. Under torch.compile the draw runs
outside the graph (a graph break in each training forward), and what follows is compiled once per stage count k.

Gradients: each stage's output is straight-through on its own input and the next residual is not detached (as in
DAC), so without projections d z_q / d z is the identity, and with them every stage's projections learn.

Written here rather than taken from vector-quantize-pytorch: its ResidualVQ stacks the library's own codebooks,
whose EMA, restarts and distributed code would replace ours (already synchronised, checked and tested across ranks);
ours reuses VectorQuantizer unchanged, so every stage keeps its behaviour, state names and rank check.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch
from torch import nn

from stage1_tokenizer.quantizer import Quantizer, QuantizerConfig, QuantizerOutput, VectorQuantizer


@dataclass
class ResidualQuantizerOutput(QuantizerOutput):
    """codes: (B, *S, k) long for the k stages used; the losses sum the stages'; perplexity is stage 0's and
    stage_perplexity (k,) every used stage's."""

    stage_perplexity: torch.Tensor


class ResidualVectorQuantizer(Quantizer):
    """RVQ (see the module docstring): ``encode(z, num_stages)`` (B, D, *S) -> (B, *S, k) long,
    ``lookup(codes)`` (B, *S, k) -> (B, D, *S), ``forward`` -> ``ResidualQuantizerOutput``."""

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        if config.kind != "rvq":
            raise ValueError(f"ResidualVectorQuantizer needs a config of kind 'rvq', got {config.kind!r}")
        self.config = config
        stage = replace(config, kind="vq", num_stages=1, quantizer_dropout=0.0)
        self.stages = nn.ModuleList(VectorQuantizer(stage) for _ in range(config.num_stages))
        self.register_buffer("dropout_seed", torch.randint(2 ** 62, ()))
        self.register_buffer("dropout_draws", torch.zeros((), dtype=torch.long))
        self._host_dropout_state: list[int] | None = None  # [seed, draws] as the buffers hold them

    @property
    def num_stages(self) -> int:
        return self.config.num_stages

    def _stages_to_use(self, num_stages: int | None) -> int:
        k = self.num_stages if num_stages is None else int(num_stages)
        if not 1 <= k <= self.num_stages:
            raise ValueError(f"num_stages must be in 1..{self.num_stages}, got {num_stages}")
        return k

    # ---- the interface -----------------------------------------------------------------------------
    def encode(self, z: torch.Tensor, num_stages: int | None = None) -> torch.Tensor:
        """(B, D, *S) features -> (B, *S, k) long codes of the first k = num_stages (default all) stages."""
        k = self._stages_to_use(num_stages)
        codes = []
        with torch.autocast(z.device.type, enabled=False):
            residual = z.float()
            for stage in self.stages[:k]:
                codes.append(stage.encode(residual))
                residual = residual - stage.lookup(codes[-1])
        return torch.stack(codes, dim=-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, *S, k), 1 <= k <= num_stages -> fp32 features (B, D, *S): the sum of the k stages' lookups."""
        if codes.dim() < 2 or not 1 <= codes.shape[-1] <= self.num_stages:
            raise ValueError(f"expected residual codes (B, *grid, stages) with 1..{self.num_stages} stages, "
                             f"got shape {tuple(codes.shape)}")
        with torch.autocast(codes.device.type, enabled=False):
            return sum(stage.lookup(codes[..., i]) for i, stage in enumerate(self.stages[:codes.shape[-1]]))

    def forward(self, z: torch.Tensor, num_stages: int | None = None) -> ResidualQuantizerOutput:
        """(B, D, *S) -> ``ResidualQuantizerOutput`` over k stages: ``num_stages`` if given (the caller keeps it
        equal on every rank), else in training a quantizer-dropout draw, else all."""
        if z.dim() < 3:
            raise ValueError(f"expected features (B, D, *spatial), got shape {tuple(z.shape)}")
        if num_stages is None and self.training and self.config.quantizer_dropout > 0:
            num_stages = self.draw_num_stages()
        k = self._stages_to_use(num_stages)
        outs = []
        with torch.autocast(z.device.type, enabled=False):
            residual, z_q = z.float(), 0.0
            for stage in self.stages[:k]:
                outs.append(stage(residual))
                z_q = z_q + outs[-1].z_q
                residual = residual - outs[-1].z_q  # not detached: see the module docstring
        return ResidualQuantizerOutput(
            z_q=z_q.to(z.dtype),
            codes=torch.stack([o.codes for o in outs], dim=-1),
            codebook_loss=sum(o.codebook_loss for o in outs),
            commitment_loss=sum(o.commitment_loss for o in outs),
            perplexity=outs[0].perplexity,
            aux_loss=sum(o.aux_loss for o in outs) + self._skipped_parameters_term(k),
            stage_perplexity=torch.stack([o.perplexity for o in outs]),
        )

    def _skipped_parameters_term(self, k: int) -> torch.Tensor | float:
        """0 times the parameters of the stages after the first k (their projections, or a gradient-learned
        codebook): DDP, built without find_unused_parameters, fails on parameters that get no gradient in a step,
        and quantizer dropout skips stages. Their gradient is then zero instead of missing."""
        skipped = [p.sum() for stage in self.stages[k:] for p in stage.parameters()]
        return 0.0 * sum(skipped) if skipped else 0.0

    @torch.compiler.disable  # a host-side draw: inside a graph its ever-growing counter would recompile it each step
    def draw_num_stages(self) -> int:
        """Quantizer dropout's k for the next training batch, the same on every rank (see the module docstring)."""
        if self._host_dropout_state is None:
            self._host_dropout_state = [int(self.dropout_seed), int(self.dropout_draws)]
        seed, draws = self._host_dropout_state
        rng = random.Random((seed * 1_000_003 + draws) % 2 ** 63)
        self._host_dropout_state[1] += 1
        self.dropout_draws += 1
        if rng.random() >= self.config.quantizer_dropout:
            return self.num_stages
        return rng.randint(1, self.num_stages)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_dropout_state = None  # read the loaded seed and counter at the next draw

    def active_fraction(self) -> float:
        """The least-used stage's fraction of recently used codes."""
        return min(stage.active_fraction() for stage in self.stages)

    def checksum(self) -> torch.Tensor:
        """The stages' checksums and the dropout draws' state (the seed reduced, so that it does not swamp the
        codebooks' digits in float64; a differing seed still shows, but for one in 65521)."""
        total = sum((i + 1) * stage.checksum() for i, stage in enumerate(self.stages))
        return total + (self.dropout_seed % 65521).double() + self.dropout_draws.double()
