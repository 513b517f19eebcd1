"""Adversarial tokenizer training: the config, the discriminator with its running logit means, and the two sides'
terms (the VQGAN recipe for images and video, the neural codecs' for audio).

The discriminator trains from ``disc_start`` (optimizer steps); the generator's GAN term ramps in from there over
``ramp_steps``, so a discriminator that knows nothing yet cannot ruin reconstructions that have converged. The
generator side calls the discriminator with its parameters frozen and outside DDP (its gradient then reaches only
the tokenizer); the discriminator side runs real and reconstructed inputs as one batch through the DDP-wrapped
discriminator (one forward, one backward, its gradients all-reduced). Its running logit means (LeCam's anchors and
the collapse watch) are averaged over ranks, so every rank holds the same state, which checkpoints carry.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.config import config_from_dict
from harness.distributed import all_reduce, world_size
from stage1_tokenizer.audio_discriminator import AudioDiscriminator, AudioDiscriminatorConfig
from stage1_tokenizer.gan_losses import (GAN_LOSSES, DiscriminatorOutput, adaptive_weight, discriminator_loss,
                                         feature_matching, generator_loss, lecam_penalty, ramp)
from stage1_tokenizer.patchgan import PatchGAN, PatchGANConfig

log = logging.getLogger("tokgen")


@dataclass
class AdversarialConfig:
    """The ``adversarial`` fields of a tokenizer training config; ``weight`` 0 (the default) trains without one."""

    weight: float = 0.0  # the GAN term's weight (times the adaptive weight when that is on); 0 = off
    loss: str = "hinge"  # hinge | non_saturating
    disc_start: int = 0  # optimizer step from which the discriminator trains and the generator term ramps in
    ramp_steps: int = 0  # the generator term rises linearly from 0 to `weight` over this many steps
    adaptive_weight: bool = True  # taming's ratio of gradient norms at the decoder's last layer
    max_adaptive_weight: float = 1e4
    lecam_weight: float = 0.0  # LeCam regularisation of the discriminator (e.g. 0.001)
    ema_decay: float = 0.99  # of the running logit means (LeCam's anchors, the collapse watch)
    feature_matching_weight: float = 0.0  # audio: L1 between the discriminator features of real and reconstructed
    lr: float | None = None  # the discriminator's learning rate (None = the tokenizer's)
    betas: tuple[float, float] = (0.5, 0.9)  # the discriminator's Adam betas (taming; the tokenizer's: the run's betas)
    grad_clip: float = 0.0
    # fields of PatchGANConfig (images, video) or AudioDiscriminatorConfig (audio); modality and in_channels come
    # from the tokenizer
    discriminator: dict = field(default_factory=dict)
    # warn when the running real and fake logit means stay further apart than this for collapse_steps steps: the
    # discriminator wins outright and the generator's gradient says little (hinge: twice its margin)
    collapse_gap: float = 4.0
    collapse_steps: int = 2000

    def __post_init__(self):
        if self.loss not in GAN_LOSSES:
            raise ValueError(f"adversarial.loss must be one of {GAN_LOSSES}, got {self.loss!r}")
        if self.weight < 0 or self.disc_start < 0 or self.ramp_steps < 0:
            raise ValueError("adversarial weight, disc_start and ramp_steps must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"adversarial.ema_decay must be in [0, 1), got {self.ema_decay}")

    @property
    def enabled(self) -> bool:
        return self.weight > 0


def discriminator_config(cfg: AdversarialConfig, modality: str, in_channels: int):
    """The discriminator's config for a tokenizer's modality, type-checked like every config."""
    if modality == "audio":
        return config_from_dict(AudioDiscriminatorConfig, cfg.discriminator)
    return config_from_dict(PatchGANConfig, {**cfg.discriminator, "modality": modality, "in_channels": in_channels})


def build_discriminator(cfg: AdversarialConfig, modality: str, in_channels: int) -> nn.Module:
    config = discriminator_config(cfg, modality, in_channels)
    return AudioDiscriminator(config) if modality == "audio" else PatchGAN(config)


class Adversary(nn.Module):
    """The discriminator and the running means of its real and fake logits per map (buffers (num_maps,)).

    ``forward(x)`` is the discriminator's forward: ``DiscriminatorOutput``."""

    def __init__(self, discriminator: nn.Module, num_maps: int, ema_decay: float):
        super().__init__()
        self.discriminator, self.ema_decay = discriminator, ema_decay
        self.register_buffer("ema_real", torch.zeros(num_maps))
        self.register_buffer("ema_fake", torch.zeros(num_maps))
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> DiscriminatorOutput:
        return self.discriminator(x)

    @torch.no_grad()
    def update_means(self, real: list[torch.Tensor], fake: list[torch.Tensor]) -> None:
        """Fold this batch's mean logits (averaged over ranks) into the running means; the first batch sets them."""
        means = torch.stack([torch.stack([r.float().mean(), f.float().mean()]) for r, f in zip(real, fake)])
        means = all_reduce(means) / world_size()
        decay = self.ema_decay if int(self.ema_updates) > 0 else 0.0
        self.ema_real.mul_(decay).add_(means[:, 0], alpha=1 - decay)
        self.ema_fake.mul_(decay).add_(means[:, 1], alpha=1 - decay)
        self.ema_updates += 1

    @property
    def logit_gap(self) -> float:
        """Running mean real logit minus fake logit, averaged over maps (a host sync)."""
        return float((self.ema_real - self.ema_fake).mean())

    def checksum(self) -> torch.Tensor:
        """A float64 fingerprint of the weights and running means, to compare across ranks."""
        total = torch.zeros((), dtype=torch.float64, device=self.ema_real.device)
        for i, t in enumerate([*self.parameters(), self.ema_real, self.ema_fake]):
            total = total + (i + 1) * t.detach().double().sum()
        return total


def build_adversary(cfg: AdversarialConfig, modality: str, in_channels: int, seed: int) -> Adversary:
    """The discriminator, initialised from its own seed: the tokenizer's random stream stays what it is without
    one, so a run with a discriminator equals the run without it up to ``disc_start``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7919)
        discriminator = build_discriminator(cfg, modality, in_channels)
    config = discriminator.config
    num_maps = len(config.periods) + len(config.stft_windows) if modality == "audio" else 1
    return Adversary(discriminator, num_maps, cfg.ema_decay)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """The module's parameters stop requiring gradients inside the block (the generator's pass through the
    discriminator must not accumulate gradients into it)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


@dataclass
class GeneratorTerms:
    """What the adversarial side adds to the tokenizer's loss, and its parts (scalars) for the logs."""

    loss: torch.Tensor  # weight * gan + feature_matching_weight * ramp * feature_matching
    gan: torch.Tensor  # the unweighted generator loss
    weight: torch.Tensor  # the GAN term's weight this step: cfg.weight * ramp * adaptive weight
    feature_matching: torch.Tensor | None


def generator_terms(cfg: AdversarialConfig, adversary: Adversary, x: torch.Tensor, recon: torch.Tensor,
                    nll: torch.Tensor, last_layer: torch.Tensor, step: int) -> GeneratorTerms | None:
    """The generator's adversarial terms after ``step`` optimizer steps (None before ``disc_start``).

    ``adversary``: the unwrapped module (no DDP hooks); ``nll``: the reconstruction terms the adaptive weight
    balances against; ``last_layer``: the decoder's last weight."""
    factor = ramp(step, cfg.disc_start, cfg.ramp_steps)
    if factor == 0.0:
        return None
    with frozen(adversary):
        # real and reconstructed together, as the discriminator's own step sees them (the same batch statistics)
        real, fake = adversary(torch.cat([x.detach(), recon.to(x.dtype)])).split(x.shape[0])
    gan = generator_loss(fake.logits, cfg.loss)
    balance = adaptive_weight(nll, gan, last_layer, cfg.max_adaptive_weight) if cfg.adaptive_weight else gan.new_ones(())
    weight = cfg.weight * factor * balance
    loss = weight * gan
    matching = None
    if cfg.feature_matching_weight > 0:
        matching = feature_matching(real.features, fake.features)
        loss = loss + cfg.feature_matching_weight * factor * matching
    return GeneratorTerms(loss=loss, gan=gan.detach(), weight=weight.detach(),
                          feature_matching=None if matching is None else matching.detach())


@dataclass
class DiscriminatorTerms:
    loss: torch.Tensor  # the GAN loss + lecam_weight * lecam
    gan: torch.Tensor
    lecam: torch.Tensor
    logits_real: torch.Tensor  # mean over maps and positions
    logits_fake: torch.Tensor


def discriminator_terms(cfg: AdversarialConfig, adversary: nn.Module, x: torch.Tensor,
                        recon: torch.Tensor) -> DiscriminatorTerms:
    """One forward of real and (detached) reconstructed inputs through ``adversary`` (DDP-wrapped or not), the
    running means updated, the loss to minimise."""
    both = adversary(torch.cat([x, recon.detach().to(x.dtype)]))
    real, fake = both.split(x.shape[0])
    module = adversary.module if hasattr(adversary, "module") else adversary
    module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper
    module.update_means(real.logits, fake.logits)
    gan = discriminator_loss(real.logits, fake.logits, cfg.loss)
    lecam = lecam_penalty(real.logits, fake.logits, module.ema_real, module.ema_fake)
    loss = gan + cfg.lecam_weight * lecam if cfg.lecam_weight > 0 else gan
    with torch.no_grad():
        logits_real = torch.stack([r.float().mean() for r in real.logits]).mean()
        logits_fake = torch.stack([f.float().mean() for f in fake.logits]).mean()
    return DiscriminatorTerms(loss=loss, gan=gan.detach(), lecam=lecam.detach(), logits_real=logits_real,
                              logits_fake=logits_fake)


class CollapseWatch:
    """Warns once when the discriminator has won outright for long: the running real-minus-fake logit gap above
    ``gap`` at every check for ``steps`` optimizer steps."""

    def __init__(self, gap: float, steps: int):
        self.gap, self.steps = gap, steps
        self.since: int | None = None
        self.warned = False

    def check(self, step: int, logit_gap: float) -> str | None:
        """Call at logging steps; returns the warning when it is issued."""
        if logit_gap <= self.gap:
            self.since = None
            return None
        self.since = step if self.since is None else self.since
        if self.warned or step - self.since < self.steps:
            return None
        self.warned = True
        message = (f"step {step}: the discriminator has won outright since step {self.since} (real and fake logits "
                   f"{logit_gap:.2f} apart on average, over {self.gap}): the generator learns little from it. Lower "
                   "adversarial.weight or the discriminator's lr, add adversarial.lecam_weight, or start it later")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        log.warning(message)
        return message


def check_adversary_in_sync(accelerator, adversary: nn.Module) -> str:
    """All-gather the discriminator's checksum; raise when ranks disagree (its gradients or running means were not
    synchronised), else say so."""
    local = accelerator.unwrap_model(adversary).checksum().reshape(1, 1).to(accelerator.device)
    gathered = accelerator.gather(local).view(-1)
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise RuntimeError(f"the discriminator differs across {accelerator.num_processes} ranks (checksums "
                           f"{gathered.tolist()}): its gradients are no longer synchronised; stopping")
    return f"discriminator in sync across {accelerator.num_processes} ranks"
