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
from stage1_tokenizer.adversarial import (AdversarialConfig, Adversary, CollapseWatch, build_adversary,
                                          check_adversary_in_sync, discriminator_config, discriminator_terms,
                                          generator_terms)
from stage1_tokenizer.audio_loss import MultiResolutionSTFTLoss, MultiScaleMelLoss
from stage1_tokenizer.base import TokenizerConfig
from stage1_tokenizer.metrics import per_frame
from stage1_tokenizer.perceptual import PerceptualLoss
from stage1_tokenizer.quantizer import Quantizer, check_codebooks_in_sync
from stage1_tokenizer.registry import TOKENIZERS, load_tokenizer, tokenizer_classes


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
    lpips_weight: float = 0.0  # images and video (per frame): LPIPS perceptual term
    stft_weight: float = 0.0  # audio: multi-resolution STFT term
    mel_weight: float = 0.0  # audio: DAC's multi-scale mel term
    # a discriminator (PatchGAN for images and video, multi-period + STFT for audio): off unless its weight is set
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    image_every: int = 250
    bad_input: str = "skip"  # skip (and report) | fail
    # hvqvae: the model's level_dropout decays linearly to 0 over this many optimizer steps, so the upper
    # levels learn to carry the picture early and training ends on the full path (0 = constant rate)
    level_dropout_steps: int = 0
    # a saved tokenizer (model, run or pipeline folder) whose weights and codebooks this run starts from, e.g. to
    # fine-tune a converged tokenizer with a discriminator; the model fields must build the same network
    init_from: str | None = None

    def __post_init__(self):
        tokenizer_classes(self.arch)  # a clear error for an unknown arch
        self.model_config  # validate the model fields now, not after the data is loaded
        if self.level_dropout_steps and self.arch != "hvqvae":
            raise ValueError("level_dropout_steps anneals a hierarchical tokenizer's level_dropout: use arch hvqvae")
        check_eval_fraction(self.eval_fraction)
        modality = self.model_config.modality
        if self.mel_weight > 0 and modality != "audio":
            raise ValueError(f"mel_weight applies to audio, not to {modality}")
        if self.adversarial.enabled:
            discriminator_config(self.adversarial, modality, self.model_config.in_channels)  # errors now, not later

    @property
    def model_config(self) -> TokenizerConfig:
        return config_from_dict(TOKENIZERS[self.arch][1], self.model)


# ---- parse ------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="built-in name (digits, photos, spoken-digits, moving-digits), a folder of images, "
                                  "audio or videos, or .tar shards (default: the config's; digits)")
    loop.add_training_arguments(p, {name: preset(name) for name in ("tokenizer-digits", "tokenizer-image")})
    p.add_argument("--lpips-weight", type=float,
                   help="images and video (per frame): weight of the LPIPS perceptual loss (default: the config's; 0)")
    p.add_argument("--stft-weight", type=float, help="audio: weight of the multi-resolution STFT loss (default: the "
                                                     "config's; 0)")
    p.add_argument("--mel-weight", type=float, help="audio: weight of the multi-scale mel loss (default: the "
                                                    "config's; 0)")
    p.add_argument("--eval-fraction", type=float,
                   help="share of a folder's files (a shard set's samples) held out for evaluation, by a stable hash "
                        f"of the path (default: the config's, else {DEFAULT_EVAL_FRACTION}; 0 = none)")
    p.add_argument("--eval-data", help="a separate held-out source (then all of --data trains)")
    p.add_argument("--init-from", help="start from this saved tokenizer's weights (a model, run or pipeline folder; "
                                       "the config must build the same network): fine-tuning")
    p.add_argument("--bad-input", choices=["skip", "fail"],
                   help="an unreadable input: skip it and list it in RUN/skipped.txt, or stop (default: skip)")


def default_preset(data: str | None) -> dict:
    return preset("tokenizer-digits" if data in (None, "digits") else "tokenizer-image")


def for_file(base: dict, file: dict) -> dict:
    """``base`` as the start of the config in ``file``: another architecture, or a model of another modality, starts
    from its own model fields (a default preset's patch or factors mean nothing for another kind of input)."""
    model, file_model = base.get("model", {}), file.get("model") or {}
    same_arch = file.get("arch", base.get("arch", "vqvae")) == base.get("arch", "vqvae")
    if same_arch and file_model.get("modality", model.get("modality")) == model.get("modality"):
        return base
    dropped = {"model", "level_dropout_steps"}  # the model's fields, and what only a hierarchy anneals
    return {key: value for key, value in base.items() if key not in dropped}


FLAGS = ("data", *loop.TRAINING_FLAGS, "lpips_weight", "stft_weight", "mel_weight", "bad_input", "eval_fraction",
         "eval_data", "init_from")


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
        base = merge(for_file(base, file), file)
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
    mel: torch.nn.Module | None  # audio: multi-scale mel loss
    dataset: torch.utils.data.Dataset
    preview: torch.Tensor  # (N, C, *S) fixed held-out inputs for pictures
    adversary: torch.nn.Module | None = None  # the discriminator (prepared), when adversarial.weight > 0
    disc_optimizer: torch.optim.Optimizer | None = None
    disc_guard: loop.BadStepGuard | None = None  # skips the discriminator's non-finite steps, as the tokenizer's

    @property
    def models(self) -> tuple[torch.nn.Module, ...]:
        """What ``accelerator.accumulate`` syncs: the tokenizer and the discriminator."""
        return (self.model,) if self.adversary is None else (self.model, self.adversary)


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
    if cfg.lpips_weight > 0 and modality in ("image", "video"):
        return PerceptualLoss().to(device)
    if cfg.stft_weight > 0 and modality == "audio":
        return MultiResolutionSTFTLoss().to(device)
    if (cfg.lpips_weight > 0 and modality == "audio") or (cfg.stft_weight > 0 and modality != "audio"):
        raise ValueError(f"lpips_weight applies to images and video (per frame) and stft_weight to audio, not to "
                         f"{modality}")
    return None


def build(cfg: TokenizerTrainConfig, accelerator) -> TrainState:
    if accelerator.distributed_type == DistributedType.FSDP:
        # the codebook's EMA statistics and restarts are all-reduced by the quantizer itself, over whole tensors
        raise ValueError("train-tokenizer runs under DDP, not FSDP (tokenizers are small; FSDP is for big priors): "
                         "launch it without --use_fsdp")
    torch.manual_seed(cfg.seed)
    model = TOKENIZERS[cfg.arch][0](cfg.model_config)
    if cfg.init_from:
        start_from(model, cfg.init_from)
    # fused: one kernel for all parameters instead of ~6 ops per tensor (tokenizers have many small tensors)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.max_steps))
    perceptual = _perceptual(cfg, accelerator.device)
    dataset = build_dataset(cfg, "train", accelerator.process_index, accelerator.num_processes)
    preview = collate_samples(list(itertools.islice(iterate_items(build_dataset(cfg, "eval")), 16)))["x"]
    mel = MultiScaleMelLoss(model.sample_rate).to(accelerator.device) if cfg.mel_weight > 0 else None
    model, optimizer, scheduler = loop.prepare(accelerator, model, optimizer, scheduler)
    state = TrainState(cfg, model, optimizer, scheduler, perceptual, mel, dataset, preview)
    if cfg.adversarial.enabled:
        state.adversary, state.disc_optimizer = _build_adversary(cfg, accelerator)
        state.disc_guard = loop.BadStepGuard(cfg.max_bad_steps)
    return state


def start_from(model: torch.nn.Module, path: str) -> None:
    """Load a saved tokenizer's weights and codebook state into ``model`` (``init_from``), strictly."""
    saved = load_tokenizer(path)
    try:
        model.load_state_dict(saved.state_dict(), strict=True)
    except RuntimeError as err:
        raise ValueError(f"init_from {path}: its weights do not fit the model this config builds ({err})") from None


def _build_adversary(cfg: TokenizerTrainConfig, accelerator) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The discriminator and its optimizer (constant learning rate, as taming), prepared after the tokenizer's."""
    m, adv = cfg.model_config, cfg.adversarial
    adversary = build_adversary(adv, m.modality, m.in_channels, cfg.seed)
    optimizer = torch.optim.Adam(adversary.parameters(), lr=adv.lr or cfg.lr, betas=adv.betas)
    return loop.prepare(accelerator, adversary, optimizer)


# ---- train ------------------------------------------------------------------------------------
def train_step(state: TrainState, batch: dict, accelerator, guard: loop.BadStepGuard) -> dict | None:
    """One micro-batch: forward, loss, backward, and (at accumulation boundaries) an optimizer step; then, with a
    discriminator past its start step, the discriminator's step on the same real and reconstructed inputs.

    Returns the logged values, or None when the step was skipped for a non-finite loss.
    """
    x = batch["x"].to(accelerator.device)
    step = state.scheduler.scheduler.last_epoch  # optimizer steps done
    kwargs = {}
    if state.cfg.arch == "hvqvae":
        kwargs["level_dropout"] = level_dropout_at(state.cfg, step)
    with accelerator.accumulate(*state.models):
        with accelerator.autocast():
            out = state.model(x, **kwargs)
            loss, terms, gan = tokenizer_loss(state, out, x, step, accelerator)
        if not loop.optimizer_step(accelerator, state.model, state.optimizer, state.scheduler, loss, guard,
                                   state.cfg.grad_clip):
            return None
        disc = discriminator_step(state, x, out.recon, step, accelerator)
    # tensors: the loop reads them (a host sync) only at logging steps
    logs = {"loss": loss.detach(), "recon_loss": out.recon_loss.detach(), "commitment_loss": out.commitment_loss.detach(),
            "codebook_loss": out.codebook_loss.detach(), "batch_perplexity": _lowest_level(out.perplexity).detach(),
            "lr": state.scheduler.get_last_lr()[0]}
    logs.update({name: value.detach() for name, (_, value) in terms.items()})
    if kwargs:
        logs["level_dropout"] = kwargs["level_dropout"]
    return {**logs, **_adversarial_logs(gan, disc)}


def tokenizer_loss(state: TrainState, out, x: torch.Tensor, step: int, accelerator):
    """The tokenizer's loss: its own terms, the perceptual and spectral ones, and (past ``disc_start``) the
    adversarial ones. Returns (loss, the weighted extra terms by log name, the ``GeneratorTerms`` or None)."""
    terms = reconstruction_terms(state, out, x)
    weighted = sum(weight * value for weight, value in terms.values())
    loss = out.loss + weighted
    if state.adversary is None:
        return loss, terms, None
    nll = out.recon_loss + weighted  # what the adaptive weight balances the GAN term against
    gan = generator_terms(state.cfg.adversarial, accelerator.unwrap_model(state.adversary), x, out.recon, nll,
                          accelerator.unwrap_model(state.model).last_layer, step)
    return (loss if gan is None else loss + gan.loss), terms, gan


def reconstruction_terms(state: TrainState, out, x: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
    """{log name: (weight, value)} of the perceptual and spectral terms beside the reconstruction loss."""
    cfg, terms = state.cfg, {}
    if state.perceptual is not None:
        name = "lpips" if cfg.lpips_weight else "stft_loss"
        video = cfg.model_config.modality == "video"
        value = per_frame(state.perceptual, out.recon, x) if video else state.perceptual(out.recon, x)
        terms[name] = (cfg.lpips_weight or cfg.stft_weight, value.mean())
    if state.mel is not None:
        terms["mel_loss"] = (cfg.mel_weight, state.mel(out.recon, x))
    return terms


def discriminator_step(state: TrainState, x: torch.Tensor, recon: torch.Tensor, step: int, accelerator):
    """The discriminator's loss on this micro-batch, backward, and its optimizer step at accumulation boundaries
    (skipped, like the tokenizer's, when the loss was not finite). None before ``disc_start``."""
    adv = state.cfg.adversarial
    if state.adversary is None or step < adv.disc_start:
        return None
    with accelerator.autocast():
        terms = discriminator_terms(adv, state.adversary, x, recon)
    loop.optimizer_step(accelerator, state.adversary, state.disc_optimizer, None, terms.loss, state.disc_guard,
                        adv.grad_clip)
    return terms


def _adversarial_logs(gan, disc) -> dict:
    logs = {}
    if gan is not None:
        logs.update(g_gan=gan.gan, gan_weight=gan.weight)
        if gan.feature_matching is not None:
            logs["feature_matching"] = gan.feature_matching
    if disc is not None:
        logs.update(d_loss=disc.loss.detach(), d_gan=disc.gan, logits_real=disc.logits_real,
                    logits_fake=disc.logits_fake, lecam=disc.lecam)
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


def loop_hooks(state: TrainState, accelerator, run_dir: Path):
    """What train-tokenizer plugs into the loop: its step, the usage (and discriminator) logs with the collapse
    watch, preview pictures, and the rank-sync checks at checkpoints."""
    cfg = state.cfg
    watch = CollapseWatch(cfg.adversarial.collapse_gap, cfg.adversarial.collapse_steps)

    def every_step(step: int) -> None:
        if cfg.image_every and step % cfg.image_every == 0 and accelerator.is_main_process:
            save_preview(state, accelerator, run_dir / "images" / f"recon_{step:08d}.png")

    def extra_logs() -> dict:
        logs = {"usage": active_codes(accelerator.unwrap_model(state.model))}
        step = state.scheduler.scheduler.last_epoch
        if state.adversary is not None and step > cfg.adversarial.disc_start:
            logs["logit_gap"] = accelerator.unwrap_model(state.adversary).logit_gap
            watch.check(step, logs["logit_gap"])
        return logs

    def sync_check() -> str:
        message = check_codebooks_in_sync(accelerator, state.model)
        if state.adversary is not None:
            message += "; " + check_adversary_in_sync(accelerator, state.adversary)
        return message

    return lambda guard: loop.LoopHooks(step=lambda batch: train_step(state, batch, accelerator, guard),
                                        extra_logs=extra_logs, every_step=every_step, sync_check=sync_check)


def train(cfg: TokenizerTrainConfig, run_dir: Path, resume: bool = False, quiet: bool = False) -> Path:
    """Train (or resume) into ``run_dir``; returns the saved model folder."""
    run_dir = Path(run_dir)
    accelerator, cfg = loop.open_run(run_dir, cfg, "tokenizer")
    state = build(cfg, accelerator)
    for module in state.models:
        module.train()
    loop.train_loop(accelerator, run_dir, cfg, state.dataset, collate_samples, loop_hooks(state, accelerator, run_dir),
                    resume=resume, quiet=quiet, desc="train-tokenizer", bad_input=cfg.bad_input)
    model = accelerator.unwrap_model(state.model)
    weights = loop.full_state_dict(accelerator, state.model)
    if accelerator.is_main_process:
        model.save_pretrained(run_dir / "model", weights)
        save_preview(state, accelerator, run_dir / "reconstructions.png")
    del state, model, weights  # the wrapped model goes before the process group (see close_run)
    loop.close_run(accelerator)
    return run_dir / "model"
