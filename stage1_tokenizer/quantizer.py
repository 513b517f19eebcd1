"""Vector quantizer for code grids of any rank: (B, D, *spatial) with 1, 2 or 3 spatial dims, and what every
quantizer shares: its config (``QuantizerConfig``, one dataclass for every kind), its interface (``Quantizer``), its
output (``QuantizerOutput``), code-usage statistics and the check that all ranks hold the same state.

The kinds: ``vq`` (this module), ``rvq`` (residual_quantizer.py), ``fsq`` (fsq.py), ``lfq`` (lfq.py);
``quantizer_registry.build_quantizer`` builds the one a config names.

Nearest codes come from matmul distances (no one-hot over the codebook), gradients pass straight
through, and the codebook learns either by exponential moving averages (default, VQ-VAE-2) or by the
gradient codebook loss. Dead codes are restarted from recent encoder outputs. Distances and EMA
statistics always run in fp32, even under autocast: bf16/fp16 distances pick wrong codes and fp16 EMA
sums overflow, which silently ruins codebooks.

A training forward never reads the device once the codebook is initialised: the finiteness check, the dead-code
restarts and the code counts are fixed-shape tensor work (masks and ``torch.where``), so a GPU's queue never empties
mid-step and the step can be compiled whole.

In multi-process training every rank must keep the identical codebook: the EMA statistics are
all-reduced, and restarts and k-means init are computed on rank 0 and broadcast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from harness.distributed import all_finite, all_reduce, broadcast, distributed, finite_on_all_ranks, rank


QUANTIZER_KINDS = ("vq", "rvq", "fsq", "lfq")
MAX_IMPLICIT_CODES = 2 ** 20  # fsq/lfq: the usage histogram holds one count per code
MAX_ENTROPY_GROUP_BITS = 12  # lfq: the batch entropy of a group takes (positions x 2^bits) probabilities


# the fields only one kind reads (the vq fields are shared: rvq stages are vq, fsq/lfq ignore them)
KIND_FIELDS = {
    "rvq": ("num_stages", "quantizer_dropout"),
    "fsq": ("levels",),
    "lfq": ("bits", "entropy_weight", "diversity_weight", "entropy_temperature", "entropy_group_bits"),
}


@dataclass
class QuantizerConfig:
    """One config for every quantizer kind. ``kind`` picks it; the fields of other kinds must stay at their
    defaults (a clear error otherwise), except the VQ fields, which fsq/lfq ignore (presets carry them)."""

    renamed_fields: ClassVar[dict[str, str]] = {"beta": "commitment_weight"}  # tokgen 0.1 called it beta

    # vq: codes; rvq: codes per stage; fsq/lfq: set from levels/bits (a value given, e.g. by a preset, is replaced)
    codebook_size: int = 512
    dim: int = 64  # channels of the encoder features it quantizes
    code_dim: int | None = None  # lookup in a lower-dimensional space (factorized codes); None = dim
    commitment_weight: float = 0.25  # weight of the commitment loss ||z - sg(e)||^2 (vq, rvq per stage, lfq)
    ema: bool = True  # EMA codebook updates; False = gradient codebook loss
    decay: float = 0.99  # EMA decay of the codebook statistics (vq, rvq), of the code-usage histogram (fsq, lfq)
    eps: float = 1e-5  # Laplace smoothing of cluster sizes
    cosine: bool = False  # l2-normalized features and codes
    restart_threshold: float = 1.0  # EMA cluster size under which a code is dead; 0 = no restarts
    kmeans_init: bool = False  # k-means on the first training batch
    kmeans_iters: int = 10
    # ---- the kind, and what each kind adds (all at defaults that keep a plain VQ: old fingerprints hold) ----
    kind: str = "vq"  # vq | rvq (residual stages of vq) | fsq (finite scalar) | lfq (lookup-free)
    num_stages: int = 1  # rvq: residual stages, each a vq with the fields above
    quantizer_dropout: float = 0.0  # rvq training: share of batches quantized with a random 1..num_stages stages
    levels: tuple[int, ...] = ()  # fsq: quantization levels per dimension, e.g. [8, 5, 5, 5] (1000 codes)
    bits: int = 0  # lfq: binary dimensions; 2^bits codes
    entropy_weight: float = 0.1  # lfq: weight of the entropy penalty (the trainer may anneal the module's copy)
    diversity_weight: float = 1.0  # lfq: weight of the codebook (batch) entropy inside the penalty
    entropy_temperature: float = 0.01  # lfq: softmax temperature of the code probabilities of the penalty
    entropy_group_bits: int = 0  # lfq: batch entropy over groups of this many bits, summed; 0 = all bits (exact)

    def __post_init__(self):
        if self.kind not in QUANTIZER_KINDS:
            raise ValueError(f"QuantizerConfig.kind must be one of {', '.join(QUANTIZER_KINDS)}, got {self.kind!r}")
        self.levels = tuple(self.levels)
        self._check_fields_of_other_kinds()
        if self.kind == "rvq":
            self._check_rvq()
        elif self.kind == "fsq":
            self._check_fsq()
            self.codebook_size = math.prod(self.levels)
        elif self.kind == "lfq":
            self._check_lfq()
            self.codebook_size = 2 ** self.bits

    def _check_fields_of_other_kinds(self) -> None:
        defaults = {f.name: f.default for f in fields(self)}
        for kind, names in KIND_FIELDS.items():
            for name in names:
                if kind != self.kind and getattr(self, name) != defaults[name]:
                    raise ValueError(f"QuantizerConfig.{name} applies to kind {kind!r}, not {self.kind!r}")

    def _check_rvq(self) -> None:
        if self.num_stages < 1:
            raise ValueError(f"QuantizerConfig.num_stages must be >= 1, got {self.num_stages}")
        if not 0.0 <= self.quantizer_dropout <= 1.0:
            raise ValueError(f"QuantizerConfig.quantizer_dropout must be in [0, 1], got {self.quantizer_dropout}")

    def _check_fsq(self) -> None:
        if not self.levels or any(level < 2 for level in self.levels):
            raise ValueError(f"QuantizerConfig.levels (fsq) needs one or more levels, each >= 2, "
                             f"got {list(self.levels)}")
        if math.prod(self.levels) > MAX_IMPLICIT_CODES:
            raise ValueError(f"fsq levels {list(self.levels)} give {math.prod(self.levels)} codes; at most "
                             f"{MAX_IMPLICIT_CODES} are supported")

    def _check_lfq(self) -> None:
        if not 1 <= self.bits <= math.log2(MAX_IMPLICIT_CODES):
            raise ValueError(f"QuantizerConfig.bits (lfq) must be in 1..{int(math.log2(MAX_IMPLICIT_CODES))}, "
                             f"got {self.bits}")
        if self.entropy_temperature <= 0:
            raise ValueError(f"QuantizerConfig.entropy_temperature must be > 0, got {self.entropy_temperature}")
        group = self.entropy_group_bits or self.bits
        if self.entropy_group_bits < 0 or self.bits % group:
            raise ValueError(f"QuantizerConfig.entropy_group_bits ({self.entropy_group_bits}) must divide "
                             f"bits ({self.bits}), or be 0 for all bits")
        if self.entropy_weight and group > MAX_ENTROPY_GROUP_BITS:
            raise ValueError(f"the exact entropy penalty over {group} bits needs 2^{group} probabilities per "
                             f"position: set entropy_group_bits to a divisor of {self.bits} of at most "
                             f"{MAX_ENTROPY_GROUP_BITS} (the penalty then sums the groups' entropies)")


@dataclass
class QuantizerOutput:
    """z_q: (B, D, *S) straight-through quantized features; codes: (B, *S) long ((B, *S, stages) for rvq);
    the losses are scalars, already weighted; ``aux_loss`` is any further penalty (lfq: entropy), 0 otherwise."""

    z_q: torch.Tensor
    codes: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor  # of this batch's code histogram
    aux_loss: torch.Tensor


def check_codes(codes: torch.Tensor, codebook_size: int) -> None:
    """Integer codes in [0, codebook_size), or a clear error."""
    if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codebook_size):
        raise ValueError(
            f"codes must lie in [0, {codebook_size}), got range "
            f"[{int(codes.min())}, {int(codes.max())}]: were they made by another tokenizer?"
        )


class Quantizer(nn.Module):
    """What every quantizer kind gives a tokenizer, for features (B, D, *S) with 1 to 3 spatial dims:
    ``encode(z)`` -> codes (B, *S) long, ``lookup(codes)`` -> the features the decoder sees (B, D, *S),
    ``forward(z)`` -> ``QuantizerOutput`` (training: straight-through gradients, state updates summed over ranks),
    ``codebook_size``, ``active_fraction()`` (recent code usage) and ``checksum()`` (to compare ranks).
    Everything that picks codes runs in fp32, also under autocast."""

    config: QuantizerConfig

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def active_fraction(self) -> float:
        """Fraction of the codes used recently (by an EMA of usage); for residual stacks the least-used stage's."""
        raise NotImplementedError

    def checksum(self) -> torch.Tensor:
        """A cheap fingerprint (float64 scalar) of the state every rank must share."""
        raise NotImplementedError

    def _projected(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, *S) -> (N, d) fp32 rows (in the order codes flatten), through ``in_proj`` when there is one."""
        flat = z.movedim(1, -1).reshape(-1, z.shape[1]).float()
        in_proj = getattr(self, "in_proj", None)
        if in_proj is not None:
            flat = F.linear(flat, in_proj.weight.float(), in_proj.bias.float())
        return flat


class VectorQuantizer(Quantizer):
    """Nearest-neighbour codebook lookup for features (B, D, *S): ``encode`` -> codes (B, *S), ``lookup`` -> the
    features the decoder sees, ``forward`` (training) -> ``QuantizerOutput`` with straight-through gradients."""

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = config
        k, d = config.codebook_size, config.code_dim or config.dim
        self.in_proj = nn.Linear(config.dim, d) if d != config.dim else None
        self.out_proj = nn.Linear(d, config.dim) if d != config.dim else None
        embed = torch.randn(k, d)
        if config.cosine:
            embed = F.normalize(embed, dim=1)
        if config.ema:
            self.register_buffer("embed", embed)
        else:
            self.embed = nn.Parameter(embed)
        # Cluster sizes start at one with sums equal to the codes, so the EMA is consistent from step
        # one (zero-initialised sizes blow unused codes up by 1/eps on the first update).
        self.register_buffer("cluster_size", torch.ones(k))
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("initialized", torch.tensor(not config.kmeans_init))
        self._initialized_seen = not config.kmeans_init  # the host's copy of `initialized` once it is True
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_updates", torch.zeros((), dtype=torch.long))

    # ---- lookup -------------------------------------------------------------------------------
    def _features(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, *S) -> (N, d) fp32 lookup-space features."""
        flat = self._projected(z)
        return F.normalize(flat, dim=1) if self.config.cosine else flat

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, d) fp32 -> (N,) index of the nearest code by squared L2 distance."""
        embed = self.embed.float()
        # ||f||^2 is the same for every code, so argmin(||e||^2 - 2 f.e) is the nearest code.
        dist_ = torch.addmm(embed.pow(2).sum(1)[None], flat, embed.t(), alpha=-2.0)
        return dist_.min(dim=1).indices  # min(dim): 2.5x faster than argmin on CPU, same first-index ties

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, *S) long -> features (B, D, *S) as the decoder sees them."""
        self._check_codes(codes)
        q = F.embedding(codes, self.embed)
        if self.out_proj is not None:
            q = self.out_proj(q)
        return rearrange(q, "b ... d -> b d ...")

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, *S) features -> (B, *S) long codes."""
        with torch.autocast(z.device.type, enabled=False):
            codes = self.nearest(self._features(z))
        return codes.view(z.shape[0], *z.shape[2:])

    def _check_codes(self, codes: torch.Tensor) -> None:
        check_codes(codes, self.codebook_size)

    # ---- training -----------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.dim() < 3:
            raise ValueError(f"expected features (B, D, *spatial), got shape {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):
            flat = self._features(z)
            if self.training and self._awaits_kmeans() and self._all_finite(flat.detach()):
                self._kmeans_init(flat.detach())  # a non-finite batch is skipped (and counted) below
            codes = self.nearest(flat.detach())
            counts = code_counts(codes, self.codebook_size)
            # Quantize with the codebook the codes were searched in, before this step's EMA update and
            # restarts (a code restarted now would otherwise hand these positions another one's features).
            q = F.embedding(codes, self.embed.float())
            if self.training:
                self._update(flat.detach(), codes, counts)
            codebook_loss = F.mse_loss(q, flat.detach()) if not self.config.ema else flat.new_zeros(())
            commitment_loss = self.config.commitment_weight * F.mse_loss(flat, q.detach())
            q = flat + (q - flat).detach()  # straight-through estimator
            if self.out_proj is not None:
                q = F.linear(q, self.out_proj.weight.float(), self.out_proj.bias.float())
        z_q = q.view(z.shape[0], *z.shape[2:], -1).movedim(-1, 1).to(z.dtype)
        return QuantizerOutput(
            z_q=z_q,
            codes=codes.view(z.shape[0], *z.shape[2:]),
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            perplexity=perplexity(counts),
            aux_loss=flat.new_zeros(()),
        )

    def _awaits_kmeans(self) -> bool:
        """True until the codebook is k-means initialised. Reads the device flag only until it is set: a read per
        step would stall a GPU's queue."""
        if not self._initialized_seen:
            self._initialized_seen = bool(self.initialized)
        return not self._initialized_seen

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized_seen = False  # the loaded flag may say otherwise: read it at the next training forward

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA statistics (summed over ranks), EMA codebook and dead-code restarts; all of it kept as it was, and
        counted in ``skipped_updates``, when any rank's features are not finite (a NaN/inf would poison the
        codebook for good). Selected with ``torch.where``, not a branch, so nothing here reads the device."""
        finite = finite_on_all_ranks(flat)
        self.skipped_updates += (~finite).long()
        counts = all_reduce(counts.clone())
        sums = all_reduce(torch.zeros_like(self.embed_sum).index_add_(0, codes, flat))
        decay = self.config.decay
        update_if(finite, self.cluster_size, self.cluster_size * decay + counts * (1 - decay))
        update_if(finite, self.embed_sum, self.embed_sum * decay + sums * (1 - decay))
        if self.config.ema:
            n = self.cluster_size.sum()
            k, eps = self.codebook_size, self.config.eps
            smoothed = (self.cluster_size + eps) / (n + k * eps) * n
            embed = self.embed_sum / smoothed[:, None]
            update_if(finite, self.embed, F.normalize(embed, dim=1) if self.config.cosine else embed)
        if self.config.restart_threshold > 0:
            self._restart_dead(flat, finite)

    @staticmethod
    def _all_finite(flat: torch.Tensor) -> bool:
        """True when every rank's features are finite (the same answer on every rank)."""
        return all_finite(flat)

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, finite: torch.Tensor) -> None:
        """Codes whose EMA cluster size fell under the threshold take a random feature row of rank 0's batch.

        Fixed shapes: every code gets a candidate row and ``torch.where`` keeps the live codes, so the number of
        dead codes is never read on the host."""
        dead = (self.cluster_size < self.config.restart_threshold) & finite  # identical on every rank
        new = torch.empty_like(self.embed_sum)
        if rank() == 0:
            new = flat[torch.randint(flat.shape[0], (self.codebook_size,), device=flat.device)]
            # more dead codes than rows: repeated picks would collide, so jitter them apart
            crowded = dead.sum() > flat.shape[0]
            new = new + torch.where(crowded, 1e-3 * flat.std(), 0.0) * torch.randn_like(new)
        new = broadcast(new.contiguous())
        if self.config.cosine:
            new = F.normalize(new, dim=1)
        size = max(self.config.restart_threshold, 1.0)
        self.embed.data.copy_(torch.where(dead[:, None], new.to(self.embed.dtype), self.embed))
        self.embed_sum.copy_(torch.where(dead[:, None], new * size, self.embed_sum))
        self.cluster_size.copy_(torch.where(dead, size, self.cluster_size))
        self.restarts += dead.sum()

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        k = self.codebook_size
        centers = torch.empty(k, flat.shape[1], device=flat.device)
        sizes = torch.empty(k, device=flat.device)
        if rank() == 0:
            centers, sizes = kmeans(flat, k, self.config.kmeans_iters)
        centers, sizes = broadcast(centers.contiguous()), broadcast(sizes.contiguous())
        if self.config.cosine:
            centers = F.normalize(centers, dim=1)
        sizes = sizes.clamp(min=1.0)
        self.embed.data.copy_(centers)
        self.cluster_size.copy_(sizes)
        self.embed_sum.copy_(centers * sizes[:, None])
        self.initialized.fill_(True)
        self._initialized_seen = True

    def checksum(self) -> torch.Tensor:
        """A cheap fingerprint of the codebook state (float64 scalar) to compare across ranks."""
        weights = torch.arange(1, self.embed.numel() + 1, device=self.embed.device, dtype=torch.float64)
        return (self.embed.double().flatten() * weights).sum() + self.cluster_size.double().sum()

    def active_fraction(self) -> float:
        """Fraction of codes whose EMA cluster size is above the restart threshold (recent usage)."""
        return float((self.cluster_size >= max(self.config.restart_threshold, 1e-3)).float().mean())


def kmeans(x: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on (N, d) points, k-means++ seeded; returns centers (k, d) and cluster sizes (k,)."""
    centers = _kmeans_pp_seeds(x, k)
    sizes = torch.zeros(k, device=x.device)
    for _ in range(iters):
        assign = torch.addmm(centers.pow(2).sum(1)[None], x, centers.t(), alpha=-2.0).argmin(1)
        sizes = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        empty = sizes == 0
        centers = torch.where(empty[:, None], centers, sums / sizes.clamp(min=1)[:, None])
    return centers, sizes


def _kmeans_pp_seeds(x: torch.Tensor, k: int) -> torch.Tensor:
    """k-means++ seeding: each next seed drawn with probability ~ squared distance to the nearest one.

    Uniformly drawn seeds often land two in one cluster and none in another, which Lloyd's iterations
    cannot undo. Points already chosen have weight zero; when all are (k > distinct points), draws are
    uniform.
    """
    n = x.shape[0]
    centers = x.new_empty(k, x.shape[1])
    centers[0] = x[torch.randint(n, (1,), device=x.device)]
    d2 = (x - centers[0]).pow(2).sum(1)
    for i in range(1, k):
        weights = torch.where(d2.sum() > 0, d2, torch.ones_like(d2))
        centers[i] = x[torch.multinomial(weights, 1)]
        d2 = torch.minimum(d2, (x - centers[i]).pow(2).sum(1))
    return centers


def update_if(condition: torch.Tensor, buffer: torch.Tensor, new: torch.Tensor) -> None:
    """``buffer`` takes ``new`` where the 0-dim bool ``condition`` holds, else keeps its value: a branch on a device
    flag without reading it."""
    buffer.copy_(torch.where(condition, new, buffer))


def code_counts(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """(N,) long codes in [0, codebook_size) -> (codebook_size,) fp32 histogram. ``torch.bincount`` would read the
    largest code back to the host on a GPU; a scatter into a fixed-size histogram does not."""
    counts = torch.zeros(codebook_size, device=codes.device)
    return counts.index_add_(0, codes.reshape(-1), torch.ones(codes.numel(), device=codes.device))


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code histogram: the effective number of codes in use."""
    p = counts / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())


class CodebookStats:
    """Code usage over a whole evaluation set: one batch misleads (it sees few codes)."""

    def __init__(self, codebook_size: int):
        self.counts = torch.zeros(codebook_size, dtype=torch.float64)

    def update(self, codes: torch.Tensor) -> None:
        self.counts += torch.bincount(codes.flatten().cpu(), minlength=self.counts.numel()).double()

    @property
    def usage(self) -> float:
        """Fraction of the codebook used at least once."""
        return float((self.counts > 0).double().mean())

    @property
    def perplexity(self) -> float:
        return float(perplexity(self.counts))


class CodeUsage(nn.Module):
    """EMA histogram of the codes a quantizer without a learned codebook (fsq, lfq) emits in training, summed
    over ranks (so identical on every rank): its recent usage, as a VQ's EMA cluster sizes are for its codes."""

    def __init__(self, codebook_size: int, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("counts", torch.zeros(codebook_size))
        self.register_buffer("skipped_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, batch_counts: torch.Tensor, features: torch.Tensor) -> None:
        """Fold in this rank's histogram (K,) of the batch, summed over ranks; ``features`` (any shape) are what the
        codes came from: a non-finite batch on any rank is skipped (and counted) on every rank, without a host
        read (``torch.where``, not a branch)."""
        finite = finite_on_all_ranks(features)
        self.skipped_updates += (~finite).long()
        counts = all_reduce(batch_counts.float().clone())
        update_if(finite, self.counts, self.counts * self.decay + counts * (1 - self.decay))

    def active_fraction(self) -> float:
        """Fraction of the codes whose EMA count is at least 1e-3 (the VQ's criterion without restarts)."""
        return float((self.counts >= 1e-3).float().mean())

    def checksum(self) -> torch.Tensor:
        weights = torch.arange(1, self.counts.numel() + 1, device=self.counts.device, dtype=torch.float64)
        return (self.counts.double() * weights).sum() + self.skipped_updates.double()


def parameters_checksum(module: nn.Module, device: torch.device) -> torch.Tensor:
    """A float64 fingerprint on ``device`` of a module's parameters (the projections DDP keeps equal), 0 if none."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in module.parameters():
        weights = torch.arange(1, p.numel() + 1, device=p.device, dtype=torch.float64)
        total = total + (p.detach().double().flatten() * weights).sum().to(device)
    return total


def check_codebooks_in_sync(accelerator, model) -> str:
    """All-gather each quantizer's checksum across processes; raise when ranks disagree, else say so."""
    quantizers = [m for m in accelerator.unwrap_model(model).modules() if isinstance(m, Quantizer)]
    local = torch.stack([q.checksum() for q in quantizers]).to(accelerator.device)
    gathered = accelerator.gather(local[None]).view(accelerator.num_processes, -1)
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise RuntimeError(
            f"codebooks differ across {accelerator.num_processes} ranks (checksums {gathered.tolist()}): "
            "the EMA statistics are no longer synchronised; stopping"
        )
    return f"codebooks in sync across {accelerator.num_processes} ranks"
