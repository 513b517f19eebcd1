"""The adversarial terms of tokenizer training, as pure functions of discriminator outputs.

A discriminator returns ``DiscriminatorOutput``: a list of logit maps (one per sub-discriminator: one for a
PatchGAN, one per period and per STFT window for the audio discriminators) and, per map, the feature maps of
its layers (for feature matching). Every loss here averages over the maps, runs in fp32 whatever autocast is
on (half-precision logits saturate the softplus and the squared LeCam terms overflow in fp16), and returns a
scalar.

- hinge: D = E[relu(1 - D(x))] + E[relu(1 + D(x^))]; G = -E[D(x^)] (taming-transformers, BigGAN).
- non-saturating: D = E[softplus(-D(x))] + E[softplus(D(x^))]; G = E[softplus(-D(x^))] (StyleGAN, LlamaGen).
- LeCam (Tseng et al. 2021): E[relu(D(x) - ema_fake)^2] + E[relu(ema_real - D(x^))^2], which keeps the
  discriminator's logits near the running means of the other side's and so from running away on small data.
- feature matching (MelGAN, EnCodec): per layer, L1 between the features of x and x^ over the mean |features of
  x|, averaged over layers and maps.
- adaptive weight (taming): ||grad_L nll|| / (||grad_L G|| + 1e-4) at the decoder's last layer L, clamped,
  so the GAN term pulls as hard as the reconstruction terms whatever their scales.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GAN_LOSSES = ("hinge", "non_saturating")


@dataclass
class DiscriminatorOutput:
    """logits: one map per sub-discriminator, each (B, 1, *S') or (B, *S'); features: per map, its layers'
    activations (B, C, *S'') in order."""

    logits: list[torch.Tensor]
    features: list[list[torch.Tensor]]

    def split(self, first: int) -> tuple["DiscriminatorOutput", "DiscriminatorOutput"]:
        """The outputs of a batch that stacked two batches (``first`` items, then the rest), apart."""
        head = DiscriminatorOutput([m[:first] for m in self.logits], [[f[:first] for f in fs] for fs in self.features])
        tail = DiscriminatorOutput([m[first:] for m in self.logits], [[f[first:] for f in fs] for fs in self.features])
        return head, tail


def _check(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"GAN loss must be one of {GAN_LOSSES}, got {kind!r}")


def _mean_over_maps(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(values).mean()


def discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor], kind: str = "hinge") -> torch.Tensor:
    """The discriminator's loss on the logit maps of real and reconstructed inputs (mean over maps)."""
    _check(kind)
    with torch.autocast(real[0].device.type, enabled=False):
        terms = []
        for r, f in zip(real, fake, strict=True):
            r, f = r.float(), f.float()
            if kind == "hinge":
                terms.append(F.relu(1 - r).mean() + F.relu(1 + f).mean())
            else:
                terms.append(F.softplus(-r).mean() + F.softplus(f).mean())
        return _mean_over_maps(terms)


def generator_loss(fake: list[torch.Tensor], kind: str = "hinge") -> torch.Tensor:
    """The generator's adversarial loss on the logit maps of its reconstructions (mean over maps)."""
    _check(kind)
    with torch.autocast(fake[0].device.type, enabled=False):
        terms = [-f.float().mean() if kind == "hinge" else F.softplus(-f.float()).mean() for f in fake]
        return _mean_over_maps(terms)


def lecam_penalty(real: list[torch.Tensor], fake: list[torch.Tensor], ema_real: torch.Tensor,
                  ema_fake: torch.Tensor) -> torch.Tensor:
    """LeCam regularisation; ``ema_real``/``ema_fake`` (num_maps,) are the running means of each map's logits."""
    with torch.autocast(real[0].device.type, enabled=False):
        terms = [F.relu(r.float() - ema_fake[i]).pow(2).mean() + F.relu(ema_real[i] - f.float()).pow(2).mean()
                 for i, (r, f) in enumerate(zip(real, fake, strict=True))]
        return _mean_over_maps(terms)


def feature_matching(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """Relative L1 between the discriminator features of real (detached here) and reconstructed inputs."""
    with torch.autocast(fake[0][0].device.type, enabled=False):
        terms = []
        for layers_r, layers_f in zip(real, fake, strict=True):
            for r, f in zip(layers_r, layers_f, strict=True):
                r = r.detach().float()
                terms.append((r - f.float()).abs().mean() / r.abs().mean().clamp_min(1e-5))
        return _mean_over_maps(terms)


def adaptive_weight(nll: torch.Tensor, gan: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """taming's balance: ||d nll / d L|| / (||d gan / d L|| + 1e-4) at the weight ``last_layer``, clamped to
    [0, max_weight], detached. Both losses keep their graphs (the backward pass follows)."""
    with torch.autocast(nll.device.type, enabled=False):
        grad_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0].float()
        grad_gan = torch.autograd.grad(gan, last_layer, retain_graph=True)[0].float()
        weight = grad_nll.norm() / (grad_gan.norm() + 1e-4)
        return torch.nan_to_num(weight.clamp(0.0, max_weight), nan=0.0).detach()


def ramp(step: int, start: int, steps: int) -> float:
    """The generator term's factor after ``step`` optimizer steps: 0 before ``start``, then linear to 1 over
    ``steps`` steps (1 at once when ``steps`` is 0)."""
    if step < start:
        return 0.0
    if steps <= 0:
        return 1.0
    return min(1.0, (step - start + 1) / steps)
