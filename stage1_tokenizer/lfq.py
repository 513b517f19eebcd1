"""Lookup-free quantization (LFQ, Yu et al. 2023, MAGVIT-v2: "Language Model Beats Diffusion").

Features (B, D, *S) are projected to ``bits`` channels (when D != bits) and each channel is quantized to its sign,
-1 or +1, with a straight-through gradient: the implicit codebook is {-1, +1}^bits, 2^bits codes, and finding a code
needs no distances. A position's code is its bits as a binary number (channel 0 the most significant, +1 = 1), one
integer per position, so LFQ codes keep the (B, *grid) contract of a VQ.

Training adds a commitment loss (features toward their +-1 values) and the paper's entropy penalty,
``entropy_weight * (E[H(p(c|z))] - diversity_weight * H(E[p(c|z)]))``, with p(c|z) = softmax over codes of
-||z - c||^2 / T: each position should be confident of its code (low per-sample entropy) while the batch uses the
codebook evenly (high codebook entropy). The softmax over {-1, +1}^bits factorises into independent bits,
p(bit_i = 1) = sigmoid(4 z_i / T), so the per-sample entropy is a sum over bits (exact for any size); the codebook
entropy is exact over all 2^bits codes, or (``entropy_group_bits``) summed over groups of bits (an upper bound of
the exact one, as Open-MAGVIT2 does for large codebooks). In training the mean probabilities are summed over all
ranks with a differentiable all-reduce, so every rank gets the same codebook entropy and DDP's averaged gradient
is that of the global batch. The module's ``entropy_weight`` attribute starts at the config's and may be set by a
trainer that anneals it (it is not saved: the schedule belongs to the trainer).

Everything runs in fp32 under autocast. Written here rather than taken from vector-quantize-pytorch: LFQ is short,
and ours shares the interface, usage statistics and rank check of the other quantizers (quantizer.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.distributed import all_reduce_with_grad
from stage1_tokenizer.quantizer import (CodeUsage, Quantizer, QuantizerConfig, QuantizerOutput, check_codes,
                                        code_counts, parameters_checksum, perplexity)


@dataclass
class LFQOutput(QuantizerOutput):
    """``aux_loss`` is the weighted entropy penalty; its two entropies (nats, unweighted, detached) are here too:
    per_sample_entropy is this rank's mean, batch_entropy the codebook entropy of the global batch in training."""

    per_sample_entropy: torch.Tensor
    batch_entropy: torch.Tensor


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of Bernoulli(sigmoid(logits)), elementwise, stable for large |logits|."""
    p = torch.sigmoid(logits)
    return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)


def bit_patterns(bits: int, device) -> torch.Tensor:
    """(2^bits, bits) float 0/1: row c holds code c's bits, the most significant first."""
    shifts = torch.arange(bits - 1, -1, -1, device=device)
    return ((torch.arange(2 ** bits, device=device)[:, None] >> shifts) & 1).float()


class LookupFreeQuantizer(Quantizer):
    """LFQ with ``config.bits`` (see the module docstring): ``encode`` (B, D, *S) -> (B, *S) long in [0, 2^bits),
    ``lookup`` back to (B, D, *S), ``forward`` -> ``LFQOutput`` with commitment loss and entropy penalty."""

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        if config.kind != "lfq":
            raise ValueError(f"LookupFreeQuantizer needs a config of kind 'lfq', got {config.kind!r}")
        self.config = config
        bits = config.bits
        self.in_proj = nn.Linear(config.dim, bits) if bits != config.dim else None
        self.out_proj = nn.Linear(bits, config.dim) if bits != config.dim else None
        self.register_buffer("place_values", 2 ** torch.arange(bits - 1, -1, -1), persistent=False)  # (bits,) long
        self.entropy_weight = config.entropy_weight
        self.usage = CodeUsage(config.codebook_size, config.decay)

    # ---- bits and codes ----------------------------------------------------------------------------
    def _features(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, *S) -> (N, bits) fp32."""
        return self._projected(z)

    def _codes(self, h: torch.Tensor) -> torch.Tensor:
        """(N, bits) -> (N,) long: positive channels are 1 bits (a NaN is a 0 bit: codes stay valid)."""
        return ((h > 0).long() * self.place_values).sum(-1)

    def _project_out(self, q: torch.Tensor) -> torch.Tensor:
        """(N, bits) -> (N, D) fp32."""
        if self.out_proj is None:
            return q
        return F.linear(q, self.out_proj.weight.float(), self.out_proj.bias.float())

    # ---- the interface -----------------------------------------------------------------------------
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, *S) features -> (B, *S) long codes."""
        with torch.autocast(z.device.type, enabled=False):
            codes = self._codes(self._features(z))
        return codes.view(z.shape[0], *z.shape[2:])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, *S) -> fp32 features (B, D, *S) as the decoder sees them."""
        check_codes(codes, self.codebook_size)
        bits = torch.div(codes.long()[..., None], self.place_values, rounding_mode="floor") % 2
        with torch.autocast(codes.device.type, enabled=False):
            q = self._project_out(bits.float() * 2 - 1)
        return q.movedim(-1, 1)

    def forward(self, z: torch.Tensor) -> LFQOutput:
        """(B, D, *S) -> ``LFQOutput``: z_q like z (straight-through signs), codes (B, *S), commitment loss and
        entropy penalty (``aux_loss``); training updates the code-usage histogram (summed over ranks)."""
        if z.dim() < 3:
            raise ValueError(f"expected features (B, D, *spatial), got shape {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):
            h = self._features(z)
            q = torch.where(h > 0, 1.0, -1.0)
            codes = self._codes(h.detach())
            counts = code_counts(codes, self.codebook_size)
            if self.training:
                self.usage.update(counts, h.detach())
            commitment_loss = self.config.commitment_weight * F.mse_loss(h, q)
            per_sample, batch = self.entropies(h) if self.entropy_weight else (h.new_zeros(()), h.new_zeros(()))
            aux_loss = self.entropy_weight * (per_sample - self.config.diversity_weight * batch)
            out = self._project_out(h + (q - h).detach())  # straight-through estimator
        z_q = out.view(z.shape[0], *z.shape[2:], -1).movedim(-1, 1).to(z.dtype)
        return LFQOutput(z_q=z_q, codes=codes.view(z.shape[0], *z.shape[2:]), codebook_loss=h.new_zeros(()),
                         commitment_loss=commitment_loss, perplexity=perplexity(counts.float()), aux_loss=aux_loss,
                         per_sample_entropy=per_sample.detach(), batch_entropy=batch.detach())

    # ---- the entropy penalty -------------------------------------------------------------------------
    def entropies(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, bits) fp32 features -> (mean per-sample entropy, codebook entropy of the batch), nats, with
        gradients. The codebook entropy's mean probabilities cover every rank's positions in training."""
        logits = 4 * h / self.config.entropy_temperature  # log-odds of +1 vs -1 under softmax(-||h - c||^2 / T)
        per_sample = binary_entropy(logits).sum(1).mean()
        group = self.config.entropy_group_bits or self.config.bits
        patterns = bit_patterns(group, h.device)  # (2^g, g)
        batch = h.new_zeros(())
        for part in logits.split(group, dim=1):  # (N, g) each
            log_probs = F.logsigmoid(part) @ patterns.t() + F.logsigmoid(-part) @ (1 - patterns).t()  # (N, 2^g)
            # the probability sums and the position count, over all ranks in one collective
            totals = torch.cat([log_probs.exp().sum(0), h.new_full((1,), h.shape[0])])
            totals = all_reduce_with_grad(totals) if self.training else totals
            mean = totals[:-1] / totals[-1]
            batch = batch - (mean * torch.log(mean.clamp(min=1e-12))).sum()
        return per_sample, batch

    def active_fraction(self) -> float:
        return self.usage.active_fraction()

    def checksum(self) -> torch.Tensor:
        return self.usage.checksum() + parameters_checksum(self, self.usage.counts.device)
