"""``tokgen train-tokenizer``: train a tokenizer (VQ-VAE, or VQ-VAE-2 with ``"arch": "hvqvae"``) on images, audio
or video with Accelerate, on one CPU, one GPU or many (DDP). The run folder gets the resolved config, checkpoints
(``--resume`` continues exactly), TensorBoard logs, reconstruction pictures and the final ``model/``.

parse config -> build -> train_step -> main.
"""
from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType

from data import build_dataset as build_data, collate_samples
from data.common import iterate_items
from data.folders import check_eval_fraction
from data.modalities import DEFAULT_EVAL_FRACTION, held_out_source
from data.pictures import save_comparison
from harness import loop
from harness.config import config_from_dict, load_config_file, merge, preset, resolve
from harness.output import emit
from harness.schedule import warmup_cosine
from stage1_tokenizer.audio_loss import MultiResolutionSTFTLoss
from stage1_tokenizer.base import TokenizerConfig
from stage1_tokenizer.perceptual import PerceptualLoss
from stage1_tokenizer.quantizer import Quantizer, check_codebooks_in_sync
from stage1_tokenizer.registry import TOKENIZERS, tokenizer_classes


@dataclass
class TokenizerTrainConfig(loop.TrainingConfig):
    arch: str = "vqvae"  # vqvae | hvqvae (hierarchical)
    model: dict = field(default_factory=dict)  # fields of VQVAEConfig / HierarchicalVQVAEConfig
    data: str = "digits"  # built-in name, folder, or WebDataset shard pattern
    # options for the data reader, e.g. {"max_digits": 1} (moving-digits) or {"frame_step": 2} (video folders);
    # evaluation and export apply them too when they read the same source
    data_options: dict = field(default_factory=dict)
    # held out for evaluation: this share of a folder's files (a shard set's samples), by a stable hash of the path;
    # or all of a separate source `eval_data` (then `data` is all training). Built-in sets have fixed splits.
    eval_fraction: float = DEFAULT_EVAL_FRACTION
    eval_data: str | None = None
    size: int = 32  # crop size (images), clip length in samples (audio), frame side (video)
    frames: int = 16  # video: frames per clip
    lpips_weight: float = 0.0  # images: LPIPS perceptual term
    stft_weight: float = 0.0  # audio: multi-resolution STFT term
    image_every: int = 250
    bad_input: str = "skip"  # skip (and report) | fail
    # hvqvae: the model's level_dropout decays linearly to 0 over this many optimizer steps, so the upper
    # levels learn to carry the picture early and training ends on the full path (0 = constant rate)
    level_dropout_steps: int = 0

    def __post_init__(self):
        tokenizer_classes(self.arch)  # a clear error for an unknown arch
        self.model_config  # validate the model fields now, not after the data is loaded
        if self.level_dropout_steps and self.arch != "hvqvae":
            raise ValueError("level_dropout_steps anneals a hierarchical tokenizer's level_dropout: use arch hvqvae")
        check_eval_fraction(self.eval_fraction)

    @property
    def model_config(self) -> TokenizerConfig:
        return config_from_dict(TOKENIZERS[self.arch][1], self.model)


# ---- parse ------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="built-in name (digits, photos, spoken-digits, moving-digits), a folder of images, "
                                  "audio or videos, or .tar shards (default: the config's; digits)")
    loop.add_training_arguments(p, {name: preset(name) for name in ("tokenizer-digits", "tokenizer-image")})
    p.add_argument("--lpips-weight", type=float, help="images: weight of the LPIPS perceptual loss (default: the "
                                                      "config's; 0)")
    p.add_argument("--stft-weight", type=float, help="audio: weight of the multi-resolution STFT loss (default: the "
                                                     "config's; 0)")
    p.add_argument("--eval-fraction", type=float,
                   help="share of a folder's files (a shard set's samples) held out for evaluation, by a stable hash "
                        f"of the path (default: the config's, else {DEFAULT_EVAL_FRACTION}; 0 = none)")
    p.add_argument("--eval-data", help="a separate held-out source (then all of --data trains)")
    p.add_argument("--bad-input", choices=["skip", "fail"],
                   help="an unreadable input: skip it and list it in RUN/skipped.txt, or stop (default: skip)")


def default_preset(data: str | None) -> dict:
    return preset("tokenizer-digits" if data in (None, "digits") else "tokenizer-image")


def for_arch(base: dict, arch: str) -> dict:
    """``base`` as the start of a config for ``arch``: another architecture starts from its own model fields."""
    if arch == base.get("arch", "vqvae"):
        return base
    dropped = {"model", "level_dropout_steps"}  # the model's fields, and what only a hierarchy anneals
    return {key: value for key, value in base.items() if key not in dropped}


FLAGS = ("data", *loop.TRAINING_FLAGS, "lpips_weight", "stft_weight", "bad_input", "eval_fraction", "eval_data")


def parse_config(args: argparse.Namespace) -> TokenizerTrainConfig:
    saved = args.out / "config.json"
    if args.resume and saved.is_file():
        # A resumed run keeps its own config; only the step budget may grow.
        stored = json.loads(saved.read_text())
        loop.check_resume_flags(args, (*FLAGS, "config"), stored)
        return resolve(TokenizerTrainConfig, stored, {"max_steps": args.max_steps})
    flags = loop.given_flags(args, FLAGS)
    base = default_preset(args.data)
    if args.config:
        file = load_config_file(args.config)
        base = merge(for_arch(base, file.get("arch", base.get("arch", "vqvae"))), file)
    if args.data and base.get("data") not in (None, args.data):
        base = {**base, "data_options": {}}  # reader options belong to the source they were written for
    return resolve(TokenizerTrainConfig, base, flags)


# ---- build ------------------------------------------------------------------------------------
@dataclass
class TrainState:
    cfg: TokenizerTrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    perceptual: torch.nn.Module | None  # LPIPS (images) or multi-resolution STFT (audio)
    dataset: torch.utils.data.Dataset
    preview: torch.Tensor  # (N, C, *S) fixed held-out inputs for pictures


def build_dataset(cfg: TokenizerTrainConfig, split: str, process_index: int = 0, num_processes: int = 1):
    """The run's data: ``split`` of ``cfg.data`` (eval: the held-out part, or ``cfg.eval_data``), as the model
    takes it. The reader options apply to ``cfg.data``, not to another held-out source."""
    m = cfg.model_config
    source, fraction = held_out_source(cfg.data, split, cfg.eval_fraction, cfg.eval_data)
    options = {"frames": cfg.frames} if m.modality == "video" else {}
    options.update(cfg.data_options if source == cfg.data else {})
    return build_data(source, modality=m.modality, split=split, size=cfg.size, channels=m.in_channels, seed=cfg.seed,
                      process_index=process_index, num_processes=num_processes, sample_rate=m.sample_rate,
                      eval_fraction=fraction, **options)


def _perceptual(cfg: TokenizerTrainConfig, device) -> torch.nn.Module | None:
    """The modality's perceptual loss, when its weight is set: LPIPS for images, STFT for audio."""
    modality = cfg.model_config.modality
    if cfg.lpips_weight > 0 and modality == "image":
        return PerceptualLoss().to(device)
    if cfg.stft_weight > 0 and modality == "audio":
        return MultiResolutionSTFTLoss().to(device)
    if (cfg.lpips_weight > 0 and modality != "image") or (cfg.stft_weight > 0 and modality != "audio"):
        raise ValueError(f"lpips_weight applies to images and stft_weight to audio, not to {modality}")
    return None


def build(cfg: TokenizerTrainConfig, accelerator) -> TrainState:
    if accelerator.distributed_type == DistributedType.FSDP:
        # the codebook's EMA statistics and restarts are all-reduced by the quantizer itself, over whole tensors
        raise ValueError("train-tokenizer runs under DDP, not FSDP (tokenizers are small; FSDP is for big priors): "
                         "launch it without --use_fsdp")
    torch.manual_seed(cfg.seed)
    model = TOKENIZERS[cfg.arch][0](cfg.model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.max_steps))
    perceptual = _perceptual(cfg, accelerator.device)
    dataset = build_dataset(cfg, "train", accelerator.process_index, accelerator.num_processes)
    preview = collate_samples(list(itertools.islice(iterate_items(build_dataset(cfg, "eval")), 16)))["x"]
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return TrainState(cfg, model, optimizer, scheduler, perceptual, dataset, preview)


# ---- train ------------------------------------------------------------------------------------
def train_step(state: TrainState, batch: dict, accelerator, guard: loop.BadStepGuard) -> dict | None:
    """One micro-batch: forward, loss, backward, and (at accumulation boundaries) an optimizer step.

    Returns the logged values, or None when the step was skipped for a non-finite loss.
    """
    x = batch["x"].to(accelerator.device)
    kwargs = {}
    if state.cfg.arch == "hvqvae":
        kwargs["level_dropout"] = level_dropout_at(state.cfg, state.scheduler.scheduler.last_epoch)
    with accelerator.accumulate(state.model):
        with accelerator.autocast():
            out = state.model(x, **kwargs)
            loss = out.loss
            perceptual = None
            if state.perceptual is not None:
                perceptual = state.perceptual(out.recon, x).mean()
                loss = loss + (state.cfg.lpips_weight or state.cfg.stft_weight) * perceptual
        if not loop.optimizer_step(accelerator, state.model, state.optimizer, state.scheduler, loss, guard,
                                   state.cfg.grad_clip):
            return None
    # tensors: the loop reads them (a host sync) only at logging steps
    logs = {"loss": loss.detach(), "recon_loss": out.recon_loss.detach(), "commitment_loss": out.commitment_loss.detach(),
            "codebook_loss": out.codebook_loss.detach(), "batch_perplexity": _lowest_level(out.perplexity).detach(),
            "lr": state.scheduler.get_last_lr()[0]}
    if perceptual is not None:
        logs["lpips" if state.cfg.lpips_weight else "stft_loss"] = perceptual.detach()
    if kwargs:
        logs["level_dropout"] = kwargs["level_dropout"]
    return logs


def level_dropout_at(cfg: TokenizerTrainConfig, step: int) -> float:
    """The hierarchical model's level-dropout rate after ``step`` optimizer steps."""
    rate = cfg.model_config.level_dropout
    if cfg.level_dropout_steps <= 0:
        return rate
    return rate * max(0.0, 1.0 - step / cfg.level_dropout_steps)


def _lowest_level(value):
    """Hierarchical outputs list a value per level (top first): the bottom level's is the one to watch."""
    return value[-1] if isinstance(value, list) else value


def active_codes(model) -> float:
    """Fraction of codes in recent use (each quantizer's ``active_fraction``: EMA cluster sizes above the restart
    threshold for vq, the EMA code histogram for fsq/lfq); the least-used quantizer's (level, rvq stage)."""
    return min(q.active_fraction() for q in model.modules() if isinstance(q, Quantizer))


@torch.no_grad()
def save_preview(state: TrainState, accelerator, path: Path) -> None:
    model = accelerator.unwrap_model(state.model)
    was_training = model.training
    model.eval()
    x = state.preview.to(accelerator.device)
    recon = model.reconstruct(x)
    model.train(was_training)
    save_comparison(x.cpu(), recon.cpu(), path, modality=model.modality, sample_rate=model.sample_rate)


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> Path:
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen train-tokenizer", description=__doc__)
        add_arguments(parser)
        args = parser.parse_args(argv)
    cfg = parse_config(args)
    model = train(cfg, args.out, resume=args.resume, quiet=args.quiet)
    if PartialState().is_main_process:
        emit(args, f"tokenizer saved to {model}", {"model": str(model), "run": str(args.out)})
    return model


def train(cfg: TokenizerTrainConfig, run_dir: Path, resume: bool = False, quiet: bool = False) -> Path:
    """Train (or resume) into ``run_dir``; returns the saved model folder."""
    run_dir = Path(run_dir)
    accelerator, cfg = loop.open_run(run_dir, cfg, "tokenizer")
    state = build(cfg, accelerator)

    def every_step(step: int) -> None:
        if cfg.image_every and step % cfg.image_every == 0 and accelerator.is_main_process:
            save_preview(state, accelerator, run_dir / "images" / f"recon_{step:08d}.png")

    def hooks(guard: loop.BadStepGuard) -> loop.LoopHooks:
        return loop.LoopHooks(
            step=lambda batch: train_step(state, batch, accelerator, guard),
            extra_logs=lambda: {"usage": active_codes(accelerator.unwrap_model(state.model))},
            every_step=every_step,
            sync_check=lambda: check_codebooks_in_sync(accelerator, state.model),
        )

    state.model.train()
    loop.train_loop(accelerator, run_dir, cfg, state.dataset, collate_samples, hooks, resume=resume, quiet=quiet,
                    desc="train-tokenizer", bad_input=cfg.bad_input)
    model = accelerator.unwrap_model(state.model)
    weights = loop.full_state_dict(accelerator, state.model)
    if accelerator.is_main_process:
        model.save_pretrained(run_dir / "model", weights)
        save_preview(state, accelerator, run_dir / "reconstructions.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir / "model"
