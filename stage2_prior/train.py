"""``tokgen train-prior``: train an autoregressive prior (transformer, gated PixelCNN or WaveNet) on one level of
exported tokens, with Accelerate; held-out bits per token and per dimension are logged and saved beside the model.

The code grid shape, codebook size, class count, depth of code stacks (a residual quantizer's stages) and (for a
lower level) the upper level's grid come from the token manifest, never from the user: the model config only says
how big the network is. Held-out bits per token count every stage of a stack.
The tokens stream from their shards (``data.tokens.TokenDataset``: split by process and data-loader worker,
a seeded shard order and shuffle buffer per epoch), so memory stays bounded whatever the token set's size,
and a resumed run continues at the exact sample. Held-out NLL, split across processes, is logged in bits
per token and bits per dimension of the original data.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from torch.utils.data import DataLoader

from data.tokens import TokenDataset, level_depth, read_manifest
from harness import loop
from harness.config import config_from_dict, load_config_file, merge, preset, resolve
from harness.output import emit, log
from harness.schedule import warmup_cosine
from stage2_prior.base import NULL_CLASS, PriorConfig
from stage2_prior.registry import ARCHS, prior_classes, write_prior_run


@dataclass
class PriorTrainConfig(loop.TrainingConfig):
    tokens: str = ""  # folder written by `tokgen export-tokens`
    level: int = 0  # 0 = top level; level k is conditioned on level k-1
    arch: str = "transformer"  # transformer | pixelcnn | wavenet
    model: dict = field(default_factory=dict)  # size of the network (dim, num_layers, ...)
    class_conditional: bool = True  # use the labels when the tokens have them
    # Share of training labels replaced by NULL_CLASS, so the prior also learns p(codes) without a class and
    # can be sampled with classifier-free guidance (`tokgen sample --guidance`); 0 = no null class.
    class_dropout: float = 0.0
    eval_every: int = 500
    shuffle_buffer: int = 1000  # samples the streaming reader shuffles among (besides the shard order)
    # processes read disjoint token shards (reading split; batches differ from a 1-process run) instead of all
    # shards in one seeded order, each keeping its share (the same global batches as one process)
    shard_split: bool = False
    # defaults that differ from the tokenizer's
    batch_size: int = 64
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_steps: int = 2000
    checkpoint_every: int = 1000

    def __post_init__(self):
        if not 0 <= self.class_dropout < 1:
            raise ValueError(f"class_dropout must lie in [0, 1), got {self.class_dropout}")


def collate(samples: list[dict]) -> dict:
    """TokenDataset samples of levels [level - 1, level] (or [level] at the top) -> {"codes", "cond", "label"}."""
    return {
        "codes": torch.stack([s["codes"][-1] for s in samples]),
        "cond": torch.stack([s["codes"][0] for s in samples]) if len(samples[0]["codes"]) > 1 else None,
        "label": torch.tensor([s["label"] for s in samples]),
    }


# ---- parse ------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", help="token folder from `tokgen export-tokens` (required)")
    loop.add_training_arguments(p, {"prior-default": preset("prior-default")})
    p.add_argument("--level", type=int, help="which level to model (0 = top); lower levels see the one above "
                                             "(default: 0)")
    p.add_argument("--arch", choices=sorted(ARCHS), help="prior architecture (default: the config's)")
    p.add_argument("--unconditional", action="store_true", help="ignore the tokens' class labels")


def parse_config(args: argparse.Namespace) -> PriorTrainConfig:
    saved = args.out / "config.json"
    if args.resume and saved.is_file():
        stored = json.loads(saved.read_text())
        loop.check_resume_flags(args, ("tokens", "level", "arch", *loop.TRAINING_FLAGS, "config", "unconditional"),
                                stored)
        return resolve(PriorTrainConfig, stored, {"max_steps": args.max_steps})
    flags = loop.given_flags(args, ("tokens", "level", "arch", *loop.TRAINING_FLAGS))
    if args.unconditional:
        flags["class_conditional"] = False
    base, file = preset("prior-default"), load_config_file(args.config) if args.config else {}
    if (args.arch or file.get("arch", base["arch"])) != base["arch"]:
        base = {**base, "model": {}}  # the default network sizes are a transformer's: another arch starts from its own
    cfg = resolve(PriorTrainConfig, merge(base, file), flags)
    if not cfg.tokens:
        raise ValueError("--tokens is required (a folder written by `tokgen export-tokens`)")
    return cfg


# ---- build ------------------------------------------------------------------------------------
def model_config(cfg: PriorTrainConfig, manifest: dict) -> PriorConfig:
    """The prior's config: network size from ``cfg.model``, shapes from the token manifest."""
    _, config_cls = prior_classes(cfg.arch)
    levels = manifest["levels"]
    if not 0 <= cfg.level < len(levels):
        raise ValueError(f"--level {cfg.level} does not exist: the tokens have {len(levels)} level(s)")
    num_classes = int(manifest.get("num_classes", 0)) if cfg.class_conditional else 0
    level, above = levels[cfg.level], levels[cfg.level - 1] if cfg.level > 0 else None
    derived = {
        "grid_shape": level["grid_shape"],
        "vocab_size": level["codebook_size"],  # of a stack: its stages' largest (one embedding table per stage)
        "num_classes": num_classes,
        "null_class": bool(num_classes and cfg.class_dropout > 0),
        "cond_grid_shape": above["grid_shape"] if above else None,
        "cond_vocab_size": above["codebook_size"] if above else 0,
        "depth": level_depth(level),  # 0 without stacks: the default, so fingerprints stay as they were
        "cond_depth": level_depth(above) if above else 0,
    }
    return config_from_dict(config_cls, {**cfg.model, **derived})


def token_stream(cfg: PriorTrainConfig, split: str, accelerator, shuffle: int) -> TokenDataset | None:
    """This process's share of a split: the level and the one above it (its conditioning); None without the split."""
    if split not in read_manifest(cfg.tokens)["splits"]:
        return None
    levels = [cfg.level - 1, cfg.level] if cfg.level > 0 else [cfg.level]
    return TokenDataset(cfg.tokens, split, levels, shuffle=shuffle, seed=cfg.seed,
                        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                        split_by="shard" if cfg.shard_split else "sample")


@dataclass
class PriorState:
    cfg: PriorTrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_set: TokenDataset
    eval_set: TokenDataset | None
    dims_per_sample: int  # scalar dimensions of one original input (C * H * W ...)


def build(cfg: PriorTrainConfig, accelerator) -> PriorState:
    manifest = read_manifest(cfg.tokens)
    model_cls, _ = prior_classes(cfg.arch)
    torch.manual_seed(cfg.seed)
    model = model_cls(model_config(cfg, manifest))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.max_steps))
    train_set = token_stream(cfg, "train", accelerator, cfg.shuffle_buffer)
    if train_set is None:
        raise ValueError(f"{cfg.tokens} has no 'train' split")
    eval_set = token_stream(cfg, "eval", accelerator, shuffle=0)
    model, optimizer, scheduler = loop.prepare(accelerator, model, optimizer, scheduler)
    return PriorState(cfg, model, optimizer, scheduler, train_set, eval_set, math.prod(manifest["input_shape"]))


def _inputs(batch: dict, model, device):
    labels = batch["label"].to(device) if model.config.num_classes else None
    cond = batch["cond"].to(device) if batch["cond"] is not None else None
    return batch["codes"].to(device), labels, cond


def drop_labels(labels: torch.Tensor | None, rate: float) -> torch.Tensor | None:
    """(B,) labels with a random share ``rate`` replaced by NULL_CLASS (torch's RNG: resumable with the run)."""
    if labels is None or rate <= 0:
        return labels
    return labels.masked_fill(torch.rand(labels.shape, device=labels.device) < rate, NULL_CLASS)


# ---- train ------------------------------------------------------------------------------------
def train_step(state: PriorState, batch: dict, accelerator, guard: loop.BadStepGuard) -> dict | None:
    model = accelerator.unwrap_model(state.model)
    codes, labels, cond = _inputs(batch, model, accelerator.device)
    if model.config.null_class:
        labels = drop_labels(labels, state.cfg.class_dropout)
    with accelerator.accumulate(state.model):
        with accelerator.autocast():
            logits = state.model(codes, labels, cond)
            loss = F.cross_entropy(logits.flatten(0, -2).float(), codes.flatten())
        if not loop.optimizer_step(accelerator, state.model, state.optimizer, state.scheduler, loss, guard,
                                   state.cfg.grad_clip):
            return None
    loss = loss.detach()  # the loop reads the logs (a host sync) only at logging steps
    return {"loss": loss, "bits_per_token": loss / math.log(2), "lr": state.scheduler.get_last_lr()[0]}


@torch.no_grad()
def evaluate(model, dataset: TokenDataset, dims_per_sample: int, accelerator=None, batch_size: int = 256) -> dict:
    """Exact held-out NLL: bits per token, per sample, and per dimension of the original data. Every process
    scores its share of the split (``dataset``); with an ``accelerator`` the sums are gathered."""
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # bits, samples
    # its own generator: a loader without one draws from torch's global RNG, which training resumes exactly
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate, generator=torch.Generator()):
        codes, labels, cond = _inputs(batch, model, device)
        totals[0] += model.nll(codes, labels, cond).double().sum() / math.log(2)
        totals[1] += codes.shape[0]
    if accelerator is not None and accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    total_bits, count = float(totals[0]), int(totals[1])
    if count == 0:
        raise ValueError("no held-out samples to evaluate")
    per_sample = total_bits / count
    return {"bits_per_token": per_sample / model.num_tokens, "bits_per_sample": per_sample,
            "bits_per_dim": per_sample / dims_per_sample, "num_samples": count}


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> Path:
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen train-prior", description=__doc__)
        add_arguments(parser)
        args = parser.parse_args(argv)
    model = train(parse_config(args), args.out, resume=args.resume, quiet=args.quiet)
    if PartialState().is_main_process:
        info = json.loads((args.out / "prior.json").read_text()) if (args.out / "prior.json").is_file() else {}
        held = info.get("eval", {})
        line = f"prior saved to {model}" + (f" ({held['bits_per_token']:.4f} held-out bits/token)" if held else "")
        emit(args, line, {"model": str(model), **info})
    return model


def train(cfg: PriorTrainConfig, run_dir: Path, resume: bool = False, quiet: bool = False) -> Path:
    """Train (or resume) into ``run_dir``; returns the saved prior folder."""
    run_dir = Path(run_dir)
    accelerator, cfg = loop.open_run(run_dir, cfg, "prior")
    state = build(cfg, accelerator)

    def every_step(step: int) -> None:
        if state.eval_set is not None and cfg.eval_every and step % cfg.eval_every == 0:
            metrics = evaluate(accelerator.unwrap_model(state.model), state.eval_set, state.dims_per_sample,
                               accelerator)
            state.model.train()
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
            if accelerator.is_main_process:
                log.info(f"step {step}: held-out {metrics['bits_per_token']:.4f} bits/token, "
                         f"{metrics['bits_per_dim']:.4f} bits/dim")

    def hooks(guard: loop.BadStepGuard) -> loop.LoopHooks:
        return loop.LoopHooks(step=lambda batch: train_step(state, batch, accelerator, guard), every_step=every_step)

    state.model.train()
    loop.train_loop(accelerator, run_dir, cfg, state.train_set, collate, hooks, resume=resume, quiet=quiet,
                    desc=f"train-prior (level {cfg.level})")
    model = accelerator.unwrap_model(state.model)
    held_out = evaluate(model, state.eval_set, state.dims_per_sample, accelerator) if state.eval_set else None
    weights = loop.full_state_dict(accelerator, state.model)
    if accelerator.is_main_process:
        model.save_pretrained(run_dir / "model", weights)
        _write_info(cfg, held_out, run_dir)
    del state, model, weights  # the wrapped model goes before the process group (see close_run)
    loop.close_run(accelerator)
    return run_dir / "model"


def _write_info(cfg: PriorTrainConfig, held_out: dict | None, run_dir: Path) -> None:
    manifest = read_manifest(cfg.tokens)
    info = {"tokenizer_fingerprint": manifest["tokenizer_fingerprint"], "level": cfg.level,
            "tokens": str(cfg.tokens), "input_shape": manifest["input_shape"], "arch": cfg.arch}
    if held_out is not None:
        info["eval"] = held_out
    if manifest.get("class_names") and cfg.class_conditional:
        info["class_names"] = manifest["class_names"]  # the folder's subfolders: make-pipeline names the classes
    write_prior_run(run_dir, info)
