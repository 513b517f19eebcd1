"""Priors over code stacks: the two ways a transformer can model the stages of a position, measured side by side.

Method: a residual-VQ tokenizer of the digits preset (``tokenizer-digits.json`` with ``"kind": "rvq"``: 32x32 ->
8x8 positions of 3 stages of 64 codes) trains ``--tokenizer-steps`` steps with ``tokgen train-tokenizer`` and
exports the built-in ``digits`` (train and held-out split) with ``tokgen export-tokens``. Two unconditional
transformer priors of the ``prior-digits`` size (dim 128, 3 layers, 4 heads, dropout 0.1) then train the same
number of steps on the same batches (batch 32, AdamW lr 1e-3, 50 warm-up steps then cosine, one thread), one after
the other:

* ``rq``: ``stage2_prior.transformer`` as shipped (RQ-Transformer, Lee et al. 2022): the spatial transformer over
  the 64 positions (input: the sum of the previous position's stage embeddings), then a 1-layer depth transformer
  over the 3 stages of each position; stage k sees every stage before the position and the stages < k at it.
* ``delay``: MusicGen's delay pattern (Copet et al. 2023), ``DelayPatternPrior`` below (not shipped): one
  transformer over 64 + 3 - 1 steps; stage k is delayed by k steps, step s reads the codes emitted at step s - 1
  (the sum of their embeddings) and head k predicts stage k of position s - k, the stages of a step in parallel. So
  stage 0 at position t does not see stages >= 1 of position t - 1 (they come later), and sampling an item takes
  66 network calls instead of 64 spatial + 192 depth calls.
* ``delay_2x``: the delay pattern trained twice the steps, about RQ's training time.

Reported: held-out bits per token (every stage: the exact NLL of the held-out split's 64 x 3 codes per item, in
bits, over 192), the median train step (forward, backward, AdamW on one batch of 32; the two architectures' steps
interleaved round by round, so a shared machine's load hits both alike) and parameters.
``python -m benchmarks.stack_priors [--keep DIR]`` (about 10 minutes on one CPU thread); the numbers quoted in
``stage2_prior/transformer.py`` are in ``benchmarks/results/stack_priors.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import ROOT, interleaved, machine_info, machine_line, median, table
from data.tokens import load_all, read_manifest
from harness.config import preset
from harness.schedule import warmup_cosine
from stage2_prior.transformer import Block, TransformerPrior, TransformerPriorConfig

STAGES, CODES = 3, 64
SIZE = {"dim": 128, "num_layers": 3, "num_heads": 4, "dropout": 0.1}


class DelayPatternPrior(nn.Module):
    """MusicGen's delay pattern over code stacks (B, N, depth) (see the module docstring); full forward only."""

    def __init__(self, cfg: TransformerPriorConfig):
        super().__init__()
        n, depth, d = math.prod(cfg.grid_shape), cfg.depth, cfg.dim
        self.depth, self.vocab = depth, cfg.vocab_size
        self.tok_emb = nn.Embedding(depth * (cfg.vocab_size + 1), d)  # + one "nothing here" code per stage
        self.pos_emb = nn.Embedding(n + depth - 1, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, depth * cfg.vocab_size, bias=False)

    def delayed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, N, depth) -> (B, N + depth, depth): stage k shifted right by k + 1, "nothing" (V) around."""
        b, n, depth = codes.shape
        out = codes.new_full((b, n + depth, depth), self.vocab)
        for k in range(depth):
            out[:, k + 1 : k + 1 + n, k] = codes[:, :, k]
        return out

    def nll_terms(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """codes (B, *grid, depth) -> (the sum of -log p in nats per item (B,), number of codes per item)."""
        lanes = self.delayed(codes.flatten(1, -2))  # step s reads lanes[:, s] and predicts lanes[:, s + 1]
        inputs, targets = lanes[:, :-1], lanes[:, 1:]
        offsets = torch.arange(self.depth, device=codes.device) * (self.vocab + 1)
        x = self.tok_emb(inputs + offsets).sum(2) + self.pos_emb.weight
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x)).unflatten(-1, (self.depth, self.vocab))
        valid = targets != self.vocab
        nll = F.cross_entropy(logits.flatten(0, -2).float(), targets.clamp(max=self.vocab - 1).flatten(),
                              reduction="none").view(targets.shape)
        return (nll * valid).sum((1, 2)), int(valid[0].sum())


def rq_terms(prior: TransformerPrior, codes: torch.Tensor) -> tuple[torch.Tensor, int]:
    return prior.nll(codes), prior.num_tokens


def train_tokenizer(tmp: Path, steps: int) -> Path:
    """A residual-VQ digits tokenizer, trained and exported with the CLI; returns the token folder."""
    values = preset("tokenizer-digits")
    values["model"]["quantizer"].update(kind="rvq", num_stages=STAGES, codebook_size=CODES)
    (tmp / "tok.json").write_text(json.dumps(values))
    cli = [sys.executable, "-m", "pipelines.cli"]
    subprocess.run([*cli, "train-tokenizer", "--config", str(tmp / "tok.json"), "--out", str(tmp / "tok"),
                    "--max-steps", str(steps), "--quiet"], cwd=ROOT, check=True)
    subprocess.run([*cli, "export-tokens", str(tmp / "tok"), "--data", "digits", "--out", str(tmp / "tokens"),
                    "--device", "cpu", "--quiet"], cwd=ROOT, check=True)
    return tmp / "tokens"


def train_prior(model: nn.Module, terms, train: torch.Tensor, steps: int, seed: int = 0) -> None:
    """``steps`` AdamW steps on seeded batches of 32 (the same batches for every model, as far as both go)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(50, steps))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (32,), generator=g)]
        step(model, terms, optimizer, batch)
        scheduler.step()


def step(model: nn.Module, terms, optimizer, batch: torch.Tensor) -> None:
    nll, count = terms(model, batch)
    loss = nll.mean() / count
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def step_times(cfg: TransformerPriorConfig, train: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median train-step milliseconds of fresh copies of each architecture, interleaved round by round (a shared
    machine's load then hits both alike), on one fixed batch of 32."""
    batch, fns = train[:32], {}
    for name, (cls, terms, _) in VARIANTS.items():
        if name in ("rq", "delay"):
            torch.manual_seed(0)
            model = cls(cfg).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            fns[name] = lambda m=model, t=terms, o=optimizer: step(m, t, o, batch)
    return {name: 1000 * median(t) for name, t in interleaved(fns, rounds, warmup=3).items()}


@torch.no_grad()
def held_out_bits(model: nn.Module, terms, codes: torch.Tensor) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(codes), 256):
        nll, per_item = terms(model, codes[start : start + 256])
        total += float(nll.double().sum()) / math.log(2)
        count += per_item * len(nll)
    return total / count


# name -> (model class, NLL terms, training steps as a multiple of --prior-steps)
VARIANTS = {"rq": (TransformerPrior, rq_terms, 1), "delay": (DelayPatternPrior, DelayPatternPrior.nll_terms, 1),
            "delay_2x": (DelayPatternPrior, DelayPatternPrior.nll_terms, 2)}
SAMPLING_CALLS = {"rq": "64 spatial + 192 depth", "delay": "66", "delay_2x": "66"}


def load_tokens(tmp: Path, tokenizer_steps: int, keep: Path | None) -> Path:
    """The token folder: ``keep`` when it already holds one, else a tokenizer trained now (into ``keep`` if given)."""
    if keep is not None and (keep / "tokens" / "manifest.json").is_file():
        return keep / "tokens"
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    return train_tokenizer(keep or tmp, tokenizer_steps)


def run(quick: bool = False, tokenizer_steps: int = 400, prior_steps: int = 800, only: list[str] | None = None,
        keep: Path | None = None) -> dict:
    torch.set_num_threads(1)
    if quick:
        tokenizer_steps, prior_steps = 50, 60
    with tempfile.TemporaryDirectory(prefix="tokgen-stacks-") as tmp:
        tokens = load_tokens(Path(tmp), tokenizer_steps, keep)
        level = read_manifest(tokens)["levels"][0]
        train, held_out = load_all(tokens, "train")[0][0], load_all(tokens, "eval")[0][0]
    cfg = TransformerPriorConfig(grid_shape=tuple(level["grid_shape"]), vocab_size=level["codebook_size"],
                                 depth=level["depth"], **SIZE)
    times = step_times(cfg, train, 5 if quick else 30)
    rows, out = [], {}
    for name in only or list(VARIANTS):
        cls, terms, multiple = VARIANTS[name]
        torch.manual_seed(0)
        model = cls(cfg)
        train_prior(model, terms, train, prior_steps * multiple)
        params = sum(p.numel() for p in model.parameters())
        out[name] = {"held_out_bits_per_token": held_out_bits(model, terms, held_out), "steps": prior_steps * multiple,
                     "step_ms": times[name.split("_")[0]], "parameters": params}
        rows.append([name, out[name]["steps"], out[name]["held_out_bits_per_token"], out[name]["step_ms"], params,
                     SAMPLING_CALLS[name]])
    markdown = table(["prior", "steps", "held-out bits/token (all stages)", "train step (ms)", "parameters",
                      "network calls to sample an item"], rows)
    return {"title": f"Transformer priors over {STAGES}-stage RVQ digits codes", "markdown": markdown, "results": out,
            "tokenizer_steps": tokenizer_steps, "train_items": len(train), "held_out_items": len(held_out)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stack_priors", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run, not the reported numbers")
    p.add_argument("--tokenizer-steps", type=int, default=400, help="steps of the residual-VQ tokenizer")
    p.add_argument("--prior-steps", type=int, default=800, help="steps of each prior (delay_2x: twice as many)")
    p.add_argument("--only", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--keep", type=Path, help="keep the tokenizer and tokens here, and reuse them when present")
    args = p.parse_args(argv)
    only = [v.strip() for v in args.only.split(",")] if args.only else None
    result = run(args.quick, args.tokenizer_steps, args.prior_steps, only, args.keep)
    print(f"Machine: {machine_line(machine_info())}\n\n## {result['title']}\n\n{result['markdown']}\n")
    print(json.dumps(result["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
