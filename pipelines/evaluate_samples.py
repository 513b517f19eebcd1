"""``tokgen evaluate-samples PIPELINE --data SRC --num N --out DIR``: how good, varied and new are the samples?

Draws N samples (class-conditional pipelines: N spread evenly over the classes) and measures them against
real items of ``--data`` (a built-in name, a folder or shards, split as ``evaluate-prior`` splits them):

- distance to real: a Frechet distance between the samples and at most ``--num-real`` held-out items, on the
  offline features of ``stage1_tokenizer.fidelity`` (images ``fd_vgg16``, video ``fd_vgg16_frames``: per-frame
  VGG16 averaged over a clip, audio ``fd_logmel``: log-mel statistics). The same distance between the held-out
  items and as many training items as there are samples is the floor: what real data scores at those sizes.
  Video also gets ``fvd`` (with its floor) when the user names StyleGAN-V's I3D file (``--fvd-weights`` or
  ``$TOKGEN_FVD_WEIGHTS``; clips of at least 9 frames).
- judge (class-conditional pipelines): the share of samples a classifier trained on the real training items
  labels as the class asked for, per class and overall; its accuracy on the held-out items is the ceiling.
- diversity: mean LPIPS (AlexNet) over random pairs of samples (video: frame t against frame t; audio has no
  LPIPS), the mean L2 distance between the pairs' normalised features (every modality), both beside the same
  figure for held-out pairs, and the share of distinct code grids (top level, all levels).
- memorization: each sample's L2 distance (normalised features) to its nearest item among at most
  ``--num-train`` training items, against the same for each held-out item. A sample nearer to a training item
  than the 1st percentile of the held-out items' nearest distances is a possible copy.

Writes ``metrics.json``, the samples as ``tokgen sample`` writes them (``samples.png`` / ``spectrograms.png`` /
``frames.png``, codes.npz) and ``closest_pairs.png``: the samples nearest to a training item (closest first),
each above its nearest training item.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset

from data import build_dataset
from data.common import iterate_items
from data.modalities import DEFAULT_EVAL_FRACTION, held_out_source, value_range
from data.pictures import save_comparison
from harness.devices import add_device_arguments
from harness.output import Stages, add_output_arguments, emit, log
from pipelines.evaluate import data_options, dataset_options
from pipelines.judge import NUM_JUDGES, judge
from pipelines.pipeline import TokgenPipeline
from pipelines.sample import generate, write_outputs
from stage1_tokenizer.fidelity import (FVD_MIN_FRAMES, FVD_WEIGHTS_ENV, I3DFeatures, VGGFeatures, audio_features,
                                       check_fvd_frames, check_fvd_weights, frechet_distance, fvd_weights_hint,
                                       fvd_weights_path, i3d_features, image_features, video_features)
from stage1_tokenizer.perceptual import PerceptualLoss
from stage2_prior.sampling import SamplingOptions

BUILTIN_MODALITIES = {"digits": "image", "photos": "image", "spoken-digits": "audio", "moving-digits": "video"}
DISTANCE_KEYS = {"image": "fd_vgg16", "video": "fd_vgg16_frames", "audio": "fd_logmel"}
FEATURE_NAMES = {"image": "VGG16 (ImageNet) conv features at 128x128, average-pooled (512)",
                 "video": "VGG16 (ImageNet) conv features at 128x128 per frame, averaged over the frames (512)",
                 "audio": "mean and std over time of 64 log-mel bands in dB (128)"}
COPY_PERCENTILE = 1.0  # a sample nearer to a training item than this percentile of held-out items is a possible copy
FEW_HELD_OUT = 100  # below this many held-out items their 1st percentile is about their minimum: a rough threshold
LPIPS_MIN_SIDE = 32  # AlexNet's strides leave no feature map below this: smaller images are upsampled to it


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", type=Path, help="pipeline folder (pipeline.json)")
    p.add_argument("--data", required=True,
                   help="the real data the pipeline learned: built-in name, folder or WebDataset shards")
    p.add_argument("--out", required=True, type=Path, help="folder for metrics.json and the pictures")
    p.add_argument("--num", type=int, default=100, help="samples to draw (class-conditional pipelines: spread "
                                                        "evenly over the classes; default: 100)")
    p.add_argument("--num-real", type=int, help="held-out real items compared (default: --num)")
    p.add_argument("--num-train", type=int, default=1000,
                   help="training items searched for each sample's nearest neighbour, evenly spaced over the "
                        "training split (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seeds the draws: the same seed gives the same samples "
                                                      "(default: 0)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="divides the logits: < 1 sharper, > 1 more varied (default: 1)")
    p.add_argument("--top-k", type=int, help="draw among the k most likely codes only, as tokgen sample "
                                             "(default: all)")
    p.add_argument("--top-p", type=float, help="draw among the smallest set of codes reaching probability p, as "
                                               "tokgen sample (default: all)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale: 1 = none (default: 1; the demos sample with theirs, "
                        "see their metrics.json)")
    p.add_argument("--batch-size", type=int, default=64, help="samples drawn together (default: 64)")
    p.add_argument("--pairs", type=int, default=1000, help="random pairs of samples for the diversity figures "
                                                          "(default: 1000)")
    p.add_argument("--closest", type=int, default=16, help="pairs shown in closest_pairs.png (default: 16)")
    p.add_argument("--judge-steps", type=int, default=600, help="training steps of the judge (default: 600, "
                                                                "as the demo's)")
    p.add_argument("--judges", type=int, default=NUM_JUDGES,
                   help=f"classifiers the judge averages (default: {NUM_JUDGES}, as the demo's: one alone moves "
                        "by several points with its seed)")
    p.add_argument("--judge-seed", type=int, default=0,
                   help="seeds the judge's classifiers, apart from the draws: the same judge for every --seed "
                        "(default: 0, as the demo's)")
    p.add_argument("--eval-fraction", type=float, default=DEFAULT_EVAL_FRACTION,
                   help="share of a folder's files (a shard set's samples) held out, by a stable hash of the path "
                        f"(default: {DEFAULT_EVAL_FRACTION})")
    p.add_argument("--eval-data", help="a separate held-out source instead of --data's held-out part")
    p.add_argument("--fvd-weights", type=Path,
                   help=f"video: StyleGAN-V's I3D file (i3d_torchscript.pt, checked by sha256) for FVD against the "
                        f"held-out clips (clips of at least {FVD_MIN_FRAMES} frames; default: ${FVD_WEIGHTS_ENV}; "
                        "without either, no FVD)")
    p.add_argument("--data-options", type=data_options, default={},
                   help="the reader options the tokenizer was trained with, as the run config's \"data_options\" "
                        "(JSON; e.g. '{\"max_digits\": 1}' for the moving-digits demo; default: none)")
    add_device_arguments(p)
    add_output_arguments(p)


def check_arguments(args: argparse.Namespace) -> None:
    """One clear line for counts no evaluation can run with."""
    for name in ("num", "num_real", "num_train"):
        value = getattr(args, name)
        if value is not None and value < 2:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 2 (a Frechet distance needs two items a set), "
                             f"got {value}")
    for name in ("batch_size", "pairs", "closest", "judge_steps", "judges"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    sampling_options(args)  # a bad temperature, top-k or top-p: before the real items are read


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    """The draws' options from the command line (checked by ``SamplingOptions``)."""
    return SamplingOptions(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           guidance=args.guidance)


def check_source(data: str, modality: str) -> None:
    """A built-in data set of another modality than the pipeline's: say so (the readers only say "unknown")."""
    builtin = BUILTIN_MODALITIES.get(data)
    if builtin is not None and builtin != modality:
        raise ValueError(f"--data {data} is {builtin} data, but this pipeline makes {modality}: use "
                         + " or ".join(k for k, v in BUILTIN_MODALITIES.items() if v == modality)
                         + ", or a folder or shards of " + modality)


# ---- real items ---------------------------------------------------------------------------------
@dataclass
class RealItems:
    """x: (N, C, *S) items as the tokenizer sees them; labels: (N,) long, -1 where unlabelled."""

    x: torch.Tensor
    labels: torch.Tensor

    def as_samples(self) -> list[dict]:
        """The items as dataset samples (what ``pipelines.judge`` reads)."""
        return [{"x": x, "label": int(y), "skipped": []} for x, y in zip(self.x, self.labels)]


def read_items(dataset, limit: int, what: str) -> RealItems:
    """At most ``limit`` items: evenly spaced over a map-style dataset (a folder sorted by class would give only its
    first classes otherwise), the first ones of a stream."""
    if isinstance(dataset, IterableDataset):
        items = [s for _, s in zip(range(limit), iterate_items(dataset))]
    else:
        n = len(dataset)
        picks = range(n) if n <= limit else torch.linspace(0, n - 1, limit).round().long().tolist()
        items = [dataset[i] for i in picks]
    if len(items) < 2:
        raise ValueError(f"the {what} split has {len(items)} item(s); at least 2 are needed")
    shapes = {tuple(s["x"].shape) for s in items}
    if len(shapes) > 1:
        raise ValueError(f"{what} items of different shapes {sorted(shapes)[:2]}: every item must have the "
                         "pipeline's input shape")
    return RealItems(torch.stack([s["x"] for s in items]).float(), torch.tensor([int(s["label"]) for s in items]))


def load_real(pipe: TokgenPipeline, args: argparse.Namespace):
    """(held-out items, training items, training dataset) of ``--data`` at the pipeline's input shape."""
    sets = {}
    for split in ("eval", "train"):
        source, fraction = held_out_source(args.data, split, args.eval_fraction, args.eval_data)
        reader = args.data_options if source == args.data else {}  # they belong to --data's reader
        sets[split] = build_dataset(source, **dataset_options(pipe, split), eval_fraction=fraction, **reader)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)  # training datasets crop at random: the same items every run
        held_out = read_items(sets["eval"], args.num_real or args.num, "held-out")
        train = read_items(sets["train"], args.num_train, "training")
    for items, what in ((held_out, "held-out"), (train, "training")):
        if tuple(items.x.shape[1:]) != tuple(pipe.input_shape):
            raise ValueError(f"the {what} items have shape {tuple(items.x.shape[1:])}, the pipeline makes "
                             f"{tuple(pipe.input_shape)}: is --data the data it learned?")
    return held_out, train, sets["train"]


def sample_labels(pipe: TokgenPipeline, num: int) -> torch.Tensor | None:
    """(num,) class labels in blocks, as evenly spread over the classes as num allows; None when unconditional."""
    if not pipe.num_classes:
        return None
    return torch.arange(num) * pipe.num_classes // num


# ---- features -----------------------------------------------------------------------------------
@dataclass
class FeatureSpace:
    """The offline features of one modality (``stage1_tokenizer.fidelity``)."""

    modality: str
    sample_rate: int
    vgg: VGGFeatures | None  # None for audio
    batch_size: int = 32

    @classmethod
    def for_pipeline(cls, pipe: TokgenPipeline, batch_size: int = 32) -> "FeatureSpace":
        vgg = None if pipe.modality == "audio" else VGGFeatures.from_shared_weights().to(pipe.device)
        return cls(pipe.modality, pipe.tokenizer.sample_rate, vgg, batch_size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, *S) in the modality's range -> (N, D) float64 features."""
        x = x.float().clamp(*value_range(self.modality))
        if self.modality == "audio":
            return audio_features(x, self.sample_rate)
        if self.modality == "video":
            return video_features(self.vgg, x, self.batch_size)
        return image_features(self.vgg, x, self.batch_size)


def normalise(features: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, D) on the unit sphere: distances compare directions, not the overall feature magnitude."""
    return F.normalize(features.double(), dim=1)


def nearest(queries: torch.Tensor, references: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """queries (N, D), references (M, D) -> (distance (N,), index (M-range) (N,)) of each query's nearest
    reference by L2, in chunks of queries so an N x M matrix never has to fit at once."""
    dists, index = [], []
    for part in queries.split(chunk):
        d, i = torch.cdist(part, references).min(dim=1)
        dists.append(d)
        index.append(i)
    return torch.cat(dists), torch.cat(index)


# ---- the measures -------------------------------------------------------------------------------
def distance_to_real(modality: str, samples: torch.Tensor, held_out: torch.Tensor, train: torch.Tensor) -> dict:
    """Frechet distances of features (N, D) samples, (M, D) held-out and (K, D) training items: samples against
    held-out, and as the floor held-out against as many training items as there are samples (min(N, K), evenly
    spaced): the bias of a Frechet distance depends on the set sizes, so the floor uses the same ones."""
    key = DISTANCE_KEYS[modality]
    picks = floor_picks(len(samples), len(train))
    return {key: frechet_distance(samples, held_out),
            f"{key}_train_vs_held_out": frechet_distance(train[picks], held_out),
            "features": FEATURE_NAMES[modality], "num_samples": len(samples), "num_held_out": len(held_out),
            "num_train_reference": len(picks)}


def floor_picks(num_samples: int, num_train: int) -> torch.Tensor:
    """(min(num_samples, num_train),) indices of the training items of the floor, evenly spaced."""
    return torch.linspace(0, num_train - 1, min(num_samples, num_train)).round().long()


def fvd_to_real(i3d: I3DFeatures, samples: torch.Tensor, held_out: torch.Tensor, train: torch.Tensor) -> dict:
    """FVD of clips (N, C, T, H, W) samples against (M, C, T, H, W) held-out ones, and its floor: held-out against
    as many (K, C, T, H, W) training clips as there are samples, picked as ``distance_to_real`` picks them."""
    real = i3d_features(i3d, held_out)
    return {"fvd": frechet_distance(i3d_features(i3d, samples), real),
            "fvd_train_vs_held_out": frechet_distance(i3d_features(i3d, train[floor_picks(len(samples), len(train))]),
                                                      real),
            "fvd_features": "StyleGAN-V's I3D (Kinetics-400), logits before the softmax (400)",
            "fvd_frames": samples.shape[2]}


@dataclass
class Memorization:
    """Nearest training items in normalised feature space.

    distance, index: (N,) each sample's nearest training item and its L2 distance; held_out_distance: (M,) the same
    for held-out real items; threshold: the ``COPY_PERCENTILE`` percentile of held_out_distance; copy: (N,) bool,
    samples nearer than it."""

    distance: torch.Tensor
    index: torch.Tensor
    held_out_distance: torch.Tensor
    threshold: float
    copy: torch.Tensor

    def closest(self, k: int) -> torch.Tensor:
        """(min(k, N),) indices of the samples nearest to a training item, closest first."""
        return self.distance.argsort()[:k]

    def to_dict(self, num_train: int, k: int) -> dict:
        return {"features": "normalised (unit L2 norm) features of the distance to real; L2 distance",
                "num_train_compared": num_train,
                "samples_nearest_train": percentiles(self.distance),
                "held_out_nearest_train": percentiles(self.held_out_distance),
                "copy_threshold": self.threshold, "copy_threshold_percentile": COPY_PERCENTILE,
                "possible_copies": float(self.copy.double().mean()), "num_possible_copies": int(self.copy.sum()),
                **({"note": f"only {len(self.held_out_distance)} held-out items: the copy threshold is about their "
                            "minimum nearest distance, a rough reference"}
                   if len(self.held_out_distance) < FEW_HELD_OUT else {}),
                "closest": [{"sample": int(i), "train_item": int(self.index[i]), "distance": float(self.distance[i])}
                            for i in self.closest(k)]}


def percentiles(values: torch.Tensor) -> dict:
    """(N,) -> min, 1st, 5th, 25th percentile, median, 75th, 95th and max."""
    qs = torch.tensor([0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0], dtype=torch.float64)
    names = ("min", "p1", "p5", "p25", "median", "p75", "p95", "max")
    return dict(zip(names, torch.quantile(values.double(), qs).tolist()))


def memorization(samples: torch.Tensor, train: torch.Tensor, held_out: torch.Tensor) -> Memorization:
    """Features (N, D) of samples, (K, D) of training items and (M, D) of held-out items -> ``Memorization``.

    The held-out items were never trained on, so their nearest distances are what "new but from the same data"
    looks like; a sample below nearly all of them (the ``COPY_PERCENTILE`` percentile) is suspiciously close."""
    train = normalise(train)
    distance, index = nearest(normalise(samples), train)
    held, _ = nearest(normalise(held_out), train)
    threshold = float(torch.quantile(held, COPY_PERCENTILE / 100))
    return Memorization(distance, index, held, threshold, distance < threshold)


def random_pairs(n: int, num_pairs: int, seed: int) -> torch.Tensor:
    """(P, 2) pairs i != j of [0, n): all n(n-1)/2 of them when there are at most ``num_pairs``, else that many
    drawn at random (seeded)."""
    if n * (n - 1) // 2 <= num_pairs:
        return torch.combinations(torch.arange(n), 2)
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(n, (num_pairs,), generator=g)
    j = (i + torch.randint(1, n, (num_pairs,), generator=g)) % n  # never i itself
    return torch.stack([i, j], 1)


def mean_pairwise_lpips(x: torch.Tensor, pairs: torch.Tensor, modality: str, perceptual: PerceptualLoss,
                        batch_size: int = 64) -> float:
    """x (N, C, H, W) images or (N, C, T, H, W) clips in [0, 1], pairs (P, 2) -> mean LPIPS over the pairs
    (clips: frame t of one against frame t of the other, all frames)."""
    device = next(perceptual.parameters()).device
    total, count = 0.0, 0
    for part in pairs.split(batch_size):
        a, b = x[part[:, 0]], x[part[:, 1]]
        if modality == "video":
            a, b = (t.transpose(1, 2).flatten(0, 1) for t in (a, b))  # (P * T, C, H, W)
        if min(a.shape[-2:]) < LPIPS_MIN_SIDE:
            size = [max(s, LPIPS_MIN_SIDE) for s in a.shape[-2:]]
            a, b = (F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in (a, b))
        d = perceptual(a.float().clamp(0, 1).to(device), b.float().clamp(0, 1).to(device))
        total, count = total + float(d.sum()), count + d.numel()
    return total / count


def distinct_share(codes: list[torch.Tensor]) -> dict:
    """codes per level (N, *grid), top first -> the share of distinct grids among the N samples, top level and all
    levels together (1.0: no two samples share their codes)."""
    n = codes[0].shape[0]
    every = torch.cat([c.reshape(n, -1) for c in codes], dim=1)
    return {"distinct_codes_top_level": len(torch.unique(codes[0].reshape(n, -1), dim=0)) / n,
            "distinct_codes_all_levels": len(torch.unique(every, dim=0)) / n}


def diversity(samples: torch.Tensor, held_out: torch.Tensor, feats: tuple[torch.Tensor, torch.Tensor],
              codes: list[torch.Tensor], modality: str, num_pairs: int, seed: int, device) -> dict:
    """Samples (N, C, *S) beside held-out items (M, C, *S) with their features (N, D), (M, D): mean pairwise LPIPS
    (not audio), mean pairwise normalised feature distance, distinct code grids."""
    out: dict = {}
    perceptual = PerceptualLoss().to(device) if modality != "audio" else None
    sample_feats, real_feats = (normalise(f) for f in feats)
    for name, x, f in (("samples", samples, sample_feats), ("held_out", held_out, real_feats)):
        pairs = random_pairs(len(x), num_pairs, seed)
        out[f"feature_distance_{name}"] = float((f[pairs[:, 0]] - f[pairs[:, 1]]).norm(dim=1).mean())
        if modality != "audio":
            out[f"lpips_{name}"] = mean_pairwise_lpips(x, pairs, modality, perceptual)
        out["num_pairs" if name == "samples" else "num_pairs_held_out"] = len(pairs)
    out["lpips"] = "AlexNet LPIPS, mean over random pairs" if modality != "audio" else "not for audio"
    return {**out, **distinct_share(codes)}



def judge_samples(pipe: TokgenPipeline, train_set, train: RealItems, held_out: RealItems, samples: torch.Tensor,
                  labels: torch.Tensor, steps: int, seed: int, num_judges: int) -> dict:
    """The judge of ``pipelines.judge`` (trained on the training split, as the demo trains it; a stream's
    ``train`` items when it has no length) on the held-out items and the samples (N, C, *S) asked for labels (N,)."""
    if int(held_out.labels.min()) < 0:
        raise ValueError(f"this pipeline is class-conditional ({pipe.num_classes} classes) but the held-out data "
                         "has unlabelled items: use labelled data (class subfolders)")
    if int(held_out.labels.max()) >= pipe.num_classes:
        raise ValueError(f"data label {int(held_out.labels.max())} is out of this pipeline's range "
                         f"[0, {pipe.num_classes})")
    source = train.as_samples() if isinstance(train_set, IterableDataset) else train_set
    result = judge(source, held_out.as_samples(), samples.float(), labels, pipe.modality, pipe.num_classes,
                   sample_rate=pipe.tokenizer.sample_rate, steps=steps, seed=seed, num_judges=num_judges).to_dict()
    names = pipe.class_names or [str(c) for c in range(pipe.num_classes)]
    per_class = result.pop("per_class_sample_accuracy")
    result["per_class_sample_accuracy"] = {n: (None if a != a else a) for n, a in zip(names, per_class)}  # NaN: none
    return {**result, "steps": steps, "seed": seed}


def write_pictures(pipe: TokgenPipeline, out: Path, samples: torch.Tensor, codes: list[torch.Tensor],
                   labels: torch.Tensor | None, train: RealItems, mem: Memorization, k: int) -> list[str]:
    """The samples as ``tokgen sample`` writes them (a row per class when they divide evenly) and
    ``closest_pairs.png``: the k samples nearest to a training item, closest first, each above that item."""
    n = len(samples)
    per_class = n // pipe.num_classes if pipe.num_classes and n % pipe.num_classes == 0 else 0
    write_outputs(pipe, out, codes, labels, samples, nrow=per_class if 1 < per_class <= 20 else min(10, n))
    save_closest_pairs(pipe, out, samples, train, mem, k)
    return sorted(p.name for p in out.glob("*.png"))


def save_closest_pairs(pipe: TokgenPipeline, out: Path, samples: torch.Tensor, train: RealItems, mem: Memorization,
                       k: int) -> None:
    """``closest_pairs.png``: the k samples (N, C, *S) nearest to a training item, closest first, each above it."""
    order = mem.closest(k)
    save_comparison(samples[order].float(), train.x[mem.index[order]], out / "closest_pairs.png",
                    modality=pipe.modality, sample_rate=pipe.tokenizer.sample_rate)


def evaluate_samples(pipe: TokgenPipeline, args: argparse.Namespace, fvd_weights: Path | None = None) -> dict:
    """Sample, measure against ``--data``'s real items, write the pictures; the metrics (see the module doc).
    ``fvd_weights``: the checked I3D file, for ``fvd`` of a video pipeline."""
    stages, started = Stages("evaluate-samples: {}"), time.perf_counter()
    held_out, train, train_set = stages.run("read real items", load_real, pipe, args)
    labels = sample_labels(pipe, args.num)
    options = sampling_options(args)
    samples, codes, seconds = stages.run("sample", generate, pipe, args.num, labels, args.seed, args.batch_size,
                                         options, quiet=args.quiet)
    space = stages.run("load features", FeatureSpace.for_pipeline, pipe)
    feats = [stages.run(f"features of {name}", space, x)
             for name, x in (("samples", samples), ("held-out", held_out.x), ("training", train.x))]
    mem = memorization(feats[0], feats[2], feats[1])
    distance = distance_to_real(pipe.modality, *feats)
    if fvd_weights is not None and pipe.modality == "video":
        i3d = stages.run("load I3D", I3DFeatures, fvd_weights).to(pipe.device)
        distance.update(stages.run("FVD", fvd_to_real, i3d, samples, held_out.x, train.x))
    metrics = {"sampling": {"num_samples": args.num, "seed": args.seed, "temperature": args.temperature,
                            "top_k": args.top_k, "top_p": args.top_p, "guidance": args.guidance,
                            "batch_size": args.batch_size, "seconds": round(seconds, 2),
                            **({"per_class": torch.bincount(labels, minlength=pipe.num_classes).tolist()}
                               if labels is not None else {})},
               "distance_to_real": distance}
    if labels is not None:
        metrics["judge"] = stages.run("judge", judge_samples, pipe, train_set, train, held_out, samples, labels,
                                      args.judge_steps, args.judge_seed, args.judges)
    metrics["diversity"] = stages.run("diversity", diversity, samples, held_out.x, (feats[0], feats[1]), codes,
                                      pipe.modality, args.pairs, args.seed, pipe.device)
    metrics["memorization"] = {**mem.to_dict(len(train.x), args.closest), "num_train_cap": args.num_train}
    metrics["pictures"] = stages.run("pictures", write_pictures, pipe, args.out, samples, codes, labels, train, mem,
                                     args.closest)
    metrics["seconds"] = {**stages.times, "total_s": round(time.perf_counter() - started, 2)}
    return metrics


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> dict:
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen evaluate-samples", description=__doc__)
        add_arguments(parser)
        args = parser.parse_args(argv)
    check_arguments(args)
    fvd_weights = fvd_weights_path(args.fvd_weights)
    if fvd_weights is not None:
        check_fvd_weights(fvd_weights)  # a wrong file stops here, before the pipeline loads
    pipe = TokgenPipeline.from_pretrained(args.pipeline, map_location=args.device, dtype=args.dtype)
    check_source(args.data, pipe.modality)
    if pipe.modality == "video" and fvd_weights is not None:
        check_fvd_frames(pipe.input_shape[1])  # refused, not padded: see benchmarks/PROTOCOL.md
    if args.guidance != 1.0 and not pipe.num_classes:
        raise ValueError(f"--guidance {args.guidance} is for class-conditional pipelines; this one is unconditional")
    args.out.mkdir(parents=True, exist_ok=True)
    if pipe.modality == "video" and fvd_weights is None:
        log.info(fvd_weights_hint())
    metrics = {"pipeline": str(args.pipeline), "fingerprint": pipe.fingerprint(), "data": args.data,
               "modality": pipe.modality, **evaluate_samples(pipe, args, fvd_weights)}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    emit(args, summary_line(metrics) + f"; wrote {args.out / 'metrics.json'}", metrics)
    return metrics


def summary_line(metrics: dict) -> str:
    d, m, v = metrics["distance_to_real"], metrics["memorization"], metrics["diversity"]
    key = DISTANCE_KEYS[metrics["modality"]]
    parts = [f"{d['num_samples']} samples: {key} {d[key]:.2f} to {d['num_held_out']} held-out items "
             f"(training items: {d[key + '_train_vs_held_out']:.2f})"]
    if "fvd" in d:
        parts.append(f"FVD {d['fvd']:.2f} (training items: {d['fvd_train_vs_held_out']:.2f})")
    if "judge" in metrics:
        j = metrics["judge"]
        parts.append(f"judge {j['sample_accuracy']:.0%} (held-out real {j['real_accuracy']:.0%})")
    if "lpips_samples" in v:
        parts.append(f"pairwise LPIPS {v['lpips_samples']:.3f} (held-out {v['lpips_held_out']:.3f})")
    parts.append(f"distinct codes {v['distinct_codes_all_levels']:.0%}")
    parts.append(f"possible copies {m['possible_copies']:.0%} (median nearest-training distance "
                 f"{m['samples_nearest_train']['median']:.3f}, held-out {m['held_out_nearest_train']['median']:.3f})")
    return ", ".join(parts)
