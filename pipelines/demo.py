"""``tokgen demo``: the whole two-stage workflow on built-in data, end to end, in one command.

Train the tokenizer, evaluate it, export tokens to shards, train a prior per level (top first, each
lower one conditioned on the level above), save the pipeline, sample, and write pictures and metrics.
A dataset is a ``DemoSpec``: presets from ``harness/presets`` plus how to sample; the flow is shared.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from data import PHOTOS_EVAL, load_photo
from data.files import center_crop_to_multiple
from data.modalities import DEFAULT_SAMPLE_RATE, value_range
from data.pictures import save_comparison, save_image_grid
from harness.config import config_from_dict, preset
from harness.output import Stages, add_output_arguments, emit, log
from pipelines import evaluate_samples as quality
from pipelines.judge import judge
from pipelines.pipeline import TokgenPipeline
from pipelines.sample import generate, write_outputs
from stage1_tokenizer import train as tok_train
from stage1_tokenizer.evaluate import evaluate
from stage1_tokenizer.export import export_tokens
from stage1_tokenizer.metrics import psnr
from stage1_tokenizer.perceptual import find_backbone
from stage1_tokenizer.registry import load_tokenizer
from stage2_prior import train as prior_train
from stage2_prior.sampling import SamplingOptions


@dataclass(frozen=True)
class DemoSpec:
    tokenizer: str  # preset name of the tokenizer training config
    priors: tuple[str, ...]  # preset name of each level's prior config, top first
    samples_per_class: int = 10  # class-conditional datasets: a row per class
    # class-conditional datasets: the first samples of each class written as files and pictures (None: all of them);
    # the judge and the sample measures take every sample (the draw moves a share of 400 by about +-2 points, of 100
    # by +-4)
    written_per_class: int | None = None
    num_samples: int = 8  # unconditional datasets
    export_size: int | None = None  # input size for the token export; None = the training size
    sample_size: int | None = None  # spatial size to sample at (conv priors take any grid); None = export size
    full_photo: bool = False  # also reconstruct a held-out photo at its full size
    temperature: float = 1.0  # sampling temperature (a small prior's tails make messy samples at 1.0)
    guidance: float = 1.0  # classifier-free guidance scale (> 1 needs priors trained with class_dropout)
    # training items searched for each sample's nearest one (memorization): VGG16 features cost ~0.1 s an image
    # (a clip: per frame) on 2 CPU cores, so the video demo searches fewer
    nearest_train_items: int = 500
    distance_items: int | None = None  # held-out items the tokenizer's FD-VGG16 compares (None: all of them)
    # the data reader's options for the items the prior learns, on top of the tokenizer's (e.g. how windows are cut)
    export_options: dict = field(default_factory=dict)
    export_stages: int | None = None  # residual quantizers: the stages the prior models (None: all)


# The class-conditional priors learn a null class (class_dropout 0.1) and sample with classifier-free
# guidance: the judge labels far more samples as the class asked for (BENCHMARKS.md §10b).
DEMOS = {
    "digits": DemoSpec("tokenizer-digits", ("prior-digits",), guidance=2.0),
    # Trained on small crops on CPU; the tokenizer and the PixelCNN priors are convolutional, so the
    # pipeline samples 256x256 images and reconstructs whole photos.
    "photos": DemoSpec("tokenizer-photos", ("prior-photos-top", "prior-photos-bottom"), num_samples=8,
                       export_size=64, sample_size=256, full_photo=True),
    # The tokenizer (4 residual stages, 16 kbit/s) trains on random 0.26 s windows (half the cost per step); tokens
    # are exported for the 0.51 s window that holds most of each spoken digit (as the held-out clips are cut), and
    # the prior learns and samples the first 2 stages of them (8 kbit/s): BENCHMARKS.md §16.
    # Guidance 1.5 rather than 2: the same draws of five demo pipelines sit 15-27% closer to the real clips and are
    # judged right more often (BENCHMARKS.md §16g, §16h). Temperature 0.9 rather than 1: 2,000 draws of each of
    # five demo pipelines sit 22-25% closer and are judged right more often at all five (§16i).
    "spoken-digits": DemoSpec("tokenizer-spoken-digits", ("prior-spoken-digits",), samples_per_class=40,
                              written_per_class=10, export_size=8192, guidance=1.5, temperature=0.9,
                              export_options={"window": "loudest"}, export_stages=2),
    "moving-digits": DemoSpec("tokenizer-moving-digits", ("prior-moving-digits",), samples_per_class=2,
                              guidance=6.0, nearest_train_items=50, distance_items=40),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", choices=sorted(DEMOS),
                   help="built-in data to run the whole workflow on (default: digits)")
    p.add_argument("--out", required=True, type=Path, help="folder for every run, the pipeline, samples and metrics")
    p.add_argument("--tokenizer-steps", type=int, help="override the tokenizer's training steps")
    p.add_argument("--prior-steps", type=int, help="override every prior's training steps")
    p.add_argument("--samples-per-class", type=int,
                   help="class-conditional datasets: samples of each class, all judged and measured (default: the "
                        "dataset's; spoken-digits draws 40 and writes the first 10 of each as files)")
    p.add_argument("--num", type=int, help="unconditional datasets: number of samples (default: the dataset's)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the dataset's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the dataset's)")
    p.add_argument("--seed", type=int, default=0, help="seeds every stage: the same seed gives the same demo")
    add_output_arguments(p)


def _tokenizer_stage(args, spec: DemoSpec, stages: Stages):
    cfg = config_from_dict(tok_train.TokenizerTrainConfig, preset(spec.tokenizer))
    cfg = replace(cfg, seed=args.seed, max_steps=args.tokenizer_steps or cfg.max_steps)
    model_dir = stages.run("train tokenizer", tok_train.train, cfg, args.out / "tokenizer_run", quiet=args.quiet)
    tokenizer = load_tokenizer(model_dir)
    # on the items the prior learns (spoken digits: whole 0.51 s words, long enough for STOI; the training windows
    # of 0.26 s are not)
    sized = items_config(cfg, spec)
    metrics = stages.run("evaluate tokenizer", evaluate, tokenizer, tok_train.build_dataset(sized, "eval"),
                         lpips=tokenizer.modality in ("image", "video"), fd_vgg16=True,
                         distance_items=spec.distance_items,
                         preview_path=args.out / "reconstructions.png", quiet=args.quiet)
    return cfg, model_dir, tokenizer, metrics


def items_config(cfg, spec: DemoSpec, size: int | None = None):
    """The tokenizer's training config, reading the items the prior learns: of ``size`` (default: the export size),
    with the spec's ``export_options`` for the data reader."""
    return replace(cfg, size=size or spec.export_size or cfg.size,
                   data_options={**cfg.data_options, **spec.export_options})


def _export_stage(args, spec: DemoSpec, cfg, tokenizer, stages: Stages) -> Path:
    sized = items_config(cfg, spec)
    datasets = {split: tok_train.build_dataset(sized, split) for split in ("train", "eval")}
    stages.run("export tokens", export_tokens, tokenizer, datasets, args.out / "tokens", batch_size=64,
               shard_size=1000, progress=not args.quiet, seed=args.seed, source=cfg.data,
               num_stages=spec.export_stages)
    return args.out / "tokens"


def _prior_stage(args, spec: DemoSpec, tokens: Path, stages: Stages) -> list[Path]:
    runs = []
    for level, name in enumerate(spec.priors):
        cfg = config_from_dict(prior_train.PriorTrainConfig, {**preset(name), "tokens": str(tokens), "level": level})
        cfg = replace(cfg, seed=args.seed, max_steps=args.prior_steps or cfg.max_steps)
        run = args.out / (f"prior_run_level{level}" if len(spec.priors) > 1 else "prior_run")
        stages.run(f"train prior level {level}" if len(spec.priors) > 1 else "train prior", prior_train.train,
                   cfg, run, quiet=args.quiet)
        runs.append(run)
    return runs


@dataclass
class DemoSamples:
    """The demo's samples. ``samples`` (N, ...) and ``codes`` (per level, (N, ...)) are every sample, which the judge
    and the measures take; ``written`` (M,) indexes the ones written as files and pictures, ``nrow`` per row."""
    samples: torch.Tensor
    codes: list[torch.Tensor]
    labels: torch.Tensor | None
    written: torch.Tensor
    nrow: int
    seconds: float
    settings: dict


def _written(num: int, per_class: int, written_per_class: int | None) -> torch.Tensor:
    """Indices of the first ``written_per_class`` samples of each class (all when None), of ``num`` samples laid out
    as ``per_class`` of each class in turn."""
    keep = per_class if written_per_class is None else min(per_class, written_per_class)
    return torch.nonzero(torch.arange(num) % per_class < keep).flatten()


def _written_note(written: torch.Tensor, num: int) -> dict:
    """When only some draws are written: which ones (``sample_000`` is draw ``written[0]``...); the judge's per-class
    figures and the memorization's sample numbers count every draw."""
    return {} if len(written) == num else {"written_draws": written.tolist()}


def check_arguments(args: argparse.Namespace, spec: DemoSpec) -> None:
    """One clear line for counts and sampling options no demo can run with, before any training (a bad
    ``--temperature`` would otherwise fail only at the sampling stage, minutes later)."""
    for name in ("tokenizer_steps", "prior_steps", "samples_per_class", "num"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    sampling_options(args, spec)


def sampling_options(args: argparse.Namespace, spec: DemoSpec) -> SamplingOptions:
    """The dataset's sampling options with ``--temperature`` / ``--guidance`` over them (checked by
    ``SamplingOptions``)."""
    temperature = spec.temperature if args.temperature is None else args.temperature
    guidance = spec.guidance if args.guidance is None else args.guidance
    return SamplingOptions(temperature=temperature, guidance=guidance)


def _sample_stage(args, spec: DemoSpec, pipe, stages: Stages) -> DemoSamples:
    if pipe.num_classes:
        per_class = args.samples_per_class or spec.samples_per_class
        labels = torch.arange(pipe.num_classes).repeat_interleave(per_class)
        num, written = len(labels), _written(len(labels), per_class, spec.written_per_class)
        nrow = len(written) // pipe.num_classes
    else:
        num = args.num or spec.num_samples
        labels, written, nrow = None, torch.arange(num), min(8, num)
    options = sampling_options(args, spec)
    samples, codes, seconds = stages.run("sample", generate, pipe, num, labels, args.seed, 100, options,
                                         quiet=args.quiet)
    return DemoSamples(samples, codes, labels, written, nrow, seconds,
                       {"temperature": options.temperature, "guidance": options.guidance})


def run(args: argparse.Namespace) -> dict:
    spec = DEMOS[args.dataset]
    check_arguments(args, spec)
    out, stages, started = args.out, Stages(), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cfg, model_dir, tokenizer, tok_metrics = _tokenizer_stage(args, spec, stages)
    tokens = _export_stage(args, spec, cfg, tokenizer, stages)
    prior_runs = _prior_stage(args, spec, tokens, stages)
    num_classes = json.loads((tokens / "manifest.json").read_text()).get("num_classes", 0)
    pipe = TokgenPipeline.from_runs(model_dir, prior_runs,
                                    class_names=[str(c) for c in range(num_classes)] if num_classes else None)
    if spec.sample_size:
        pipe = pipe.with_input_shape((pipe.input_shape[0],) + (spec.sample_size,) * (len(pipe.input_shape) - 1))
    pipe.save_pretrained(out / "pipeline")
    if spec.full_photo:
        tok_metrics.update(stages.run("reconstruct a whole held-out photo", _full_photo, tokenizer, out))
    drawn = _sample_stage(args, spec, pipe, stages)
    samples, codes, labels, shown = drawn.samples, drawn.codes, drawn.labels, drawn.written
    judged = None
    if labels is not None:
        judged = stages.run("judge samples", _judge, spec, cfg, tokenizer, samples, labels, num_classes, out, shown)
    write_outputs(pipe, out, [c[shown] for c in codes], None if labels is None else labels[shown], samples[shown],
                  nrow=drawn.nrow)
    measured = stages.run("measure samples", _measure_samples, spec, cfg, pipe, samples, codes, args.seed, out)
    metrics = {
        "dataset": args.dataset,
        "modality": pipe.modality,
        "tokenizer": _tokenizer_summary(tok_metrics),
        "prior": {**_prior_summary(prior_runs), **_prior_stages(pipe, tok_metrics)},
        "sampling": {"num_samples": samples.shape[0], "num_written": len(shown), **_written_note(shown, len(samples)),
                     "seconds": drawn.seconds, **drawn.settings,
                     "tokens_per_s": samples.shape[0] * pipe.num_tokens / drawn.seconds,
                     **({"judge": judged} if judged else {}), **measured},
        "timing": {**stages.times, "total_s": round(time.perf_counter() - started, 2)},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _measure_samples(spec: DemoSpec, cfg, pipe: TokgenPipeline, samples: torch.Tensor, codes: list[torch.Tensor],
                     seed: int, out: Path) -> dict:
    """What ``tokgen evaluate-samples`` measures, on the demo's samples and data (benchmarks/PROTOCOL.md): distance to
    as many held-out items as there are samples, diversity, memorization against ``spec.nearest_train_items``
    training items; ``closest_pairs.png``. (The judge ran before, on every held-out item.)"""
    if pipe.modality != "audio" and find_backbone("vgg") is None:  # a demo still finishes, as without LPIPS
        log.warning("samples not measured: the offline VGG16 backbone (vgg16_features.safetensors) is not in "
                    "$TOKGEN_WEIGHTS or shared/weights (see `tokgen evaluate-samples`)")
        return {}
    sized = items_config(cfg, spec, spec.sample_size)  # the items the pipeline makes
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # training datasets crop at random: the same items every run
        held_out = quality.read_items(tok_train.build_dataset(sized, "eval"), len(samples), "held-out")
        train = quality.read_items(tok_train.build_dataset(sized, "train"), spec.nearest_train_items, "training")
    space = quality.FeatureSpace.for_pipeline(pipe)
    feats = [space(x) for x in (samples, held_out.x, train.x)]
    mem = quality.memorization(feats[0], feats[2], feats[1])
    quality.save_closest_pairs(pipe, out, samples, train, mem, 16)
    return {"distance_to_real": quality.distance_to_real(pipe.modality, *feats),
            "diversity": quality.diversity(samples, held_out.x, (feats[0], feats[1]), codes, pipe.modality, 1000,
                                           seed, pipe.device),
            "memorization": mem.to_dict(len(train.x), 16)}


def _judge(spec: DemoSpec, cfg, tokenizer, samples: torch.Tensor, labels: torch.Tensor, num_classes: int, out: Path,
           shown: torch.Tensor) -> dict:
    """Classifiers trained on the real training items label the held-out items, the tokenizer's reconstructions of
    them and every sample (see ``pipelines.judge``); ``samples_vs_real.png`` shows each sample of ``shown`` (M,)
    below a held-out real item of the class it was asked for. The judge's seed is its own (0), not the demo's: every
    seed's samples face the same judge."""
    sized = items_config(cfg, spec)  # the items the prior learned and samples
    eval_set = tok_train.build_dataset(sized, "eval")
    held_out = [eval_set[i] for i in range(len(eval_set))]  # read once: the judge and the picture share them
    m = cfg.model_config
    rate = m.sample_rate or DEFAULT_SAMPLE_RATE
    result = judge(tok_train.build_dataset(sized, "train"), held_out, samples, labels, m.modality, num_classes,
                   sample_rate=rate, reconstruct=tokenizer.reconstruct).to_dict()
    real_x = _real_of_classes(held_out, labels[shown].tolist()).to(samples.dtype)
    save_comparison(real_x, samples[shown].clamp(*value_range(m.modality)), out / "samples_vs_real.png",
                    modality=m.modality, sample_rate=rate)
    return result


def _real_of_classes(held_out: list[dict], asked: list[int]) -> torch.Tensor:
    """A held-out item's ``x`` for each class in ``asked``, stacked (M, ...): the items of a class asked k times are
    spread over its pool (neighbours are often the same voice or motion)."""
    by_class: dict[int, list[int]] = {}
    for i, item in enumerate(held_out):
        by_class.setdefault(int(item["label"]), []).append(i)
    seen: dict[int, int] = {}
    real = []
    for c in asked:
        pool = by_class.get(c) or [0]
        real.append(held_out[pool[seen.get(c, 0) * len(pool) // asked.count(c)]]["x"])
        seen[c] = seen.get(c, 0) + 1
    return torch.stack(real)


@torch.no_grad()
def _full_photo(tokenizer, out: Path) -> dict:
    """Encode and decode a held-out photo at its full size; save it beside its reconstruction."""
    name = PHOTOS_EVAL[0]
    x = center_crop_to_multiple(load_photo(name), tokenizer.downsampling)[None]
    recon = tokenizer.reconstruct(x)
    save_image_grid(torch.cat([x, recon]), out / "reconstruction_full.png", nrow=2)
    return {"full_photo": {"name": name, "shape": list(x.shape[1:]), "psnr_db": float(psnr(recon, x)[0]),
                           "codes": [list(c.shape[1:]) for c in tokenizer.encode_levels(x)]}}


def _tokenizer_summary(m: dict) -> dict:
    keys = ("psnr_db", "ssim", "lpips", "fd_vgg16", "fd_vgg16_frames", "snr_db", "si_sdr_db", "stoi", "mel_distance",
            "mel_distance_multiscale", "bitrate_kbps", "sample_rate", "codebook_usage", "codebook_usage_per_level",
            "code_depth", "codebook_usage_per_stage", "perplexity", "codes_per_input", "compression_ratio", "full_photo",
            "unscored_items", "num_samples", "distance_items")
    return {k: m[k] for k in keys if k in m}


def _prior_summary(prior_runs: list[Path]) -> dict:
    """Held-out bits per level, summed into totals (bits per dim add up across levels)."""
    infos = [json.loads((run / "prior.json").read_text())["eval"] for run in prior_runs]
    total_bits = sum(i["bits_per_sample"] for i in infos)
    tokens = sum(i["bits_per_sample"] / i["bits_per_token"] for i in infos)
    out = {"bits_per_token": total_bits / tokens, "bits_per_dim": sum(i["bits_per_dim"] for i in infos),
           "bits_per_sample": total_bits}
    if len(infos) > 1:
        out["per_level"] = infos
    return out


def _prior_stages(pipe: TokgenPipeline, tok_metrics: dict) -> dict:
    """For code stacks: the stages the priors model of the tokenizer's, and (audio) the bitrate of those codes."""
    if not pipe.code_depth:
        return {}
    out = {"stages": pipe.code_depth, "tokenizer_stages": pipe.tokenizer.code_depth}
    if "bitrate_kbps" in tok_metrics:
        out["bitrate_kbps"] = tok_metrics["bitrate_kbps"] * pipe.code_depth / pipe.tokenizer.code_depth
    return out


LOOK_AT = {"image": ("samples.png", "reconstructions.png", "closest_pairs.png"),
           "audio": ("sample_*.wav", "spectrograms.png", "samples_vs_real.png", "closest_pairs.png"),
           "video": ("sample_*.mp4", "frames.png", "samples_vs_real.png", "reconstructions.png", "closest_pairs.png")}


def sampling_knobs(sampling: dict) -> dict:
    """The demo's sampling options that differ from ``tokgen sample``'s defaults (temperature, guidance): more
    samples like these need the same flags."""
    return {k: sampling[k] for k in ("temperature", "guidance") if sampling.get(k, 1.0) != 1.0}


def summary(metrics: dict, out: Path) -> str:
    t, p, s = metrics["tokenizer"], metrics["prior"], metrics["sampling"]
    knobs = sampling_knobs(s)
    photo = t.get("full_photo")
    extra = [f"  whole held-out photo {photo['name']} {photo['shape']}: {photo['psnr_db']:.2f} dB"] if photo else []
    if "judge" in s:
        j = s["judge"]
        recon = (f", {j['reconstruction_accuracy']:.0%} of their reconstructions" if "reconstruction_accuracy" in j
                 else "")
        extra.append(f"  judge:     {j['num_judges']} classifiers trained on real data label "
                     f"{j['sample_accuracy']:.0%} of the {j['num_samples']} samples as the class asked for "
                     f"({j['real_accuracy']:.0%} of held-out real items{recon})")
    d, m = s.get("distance_to_real"), s.get("memorization")
    key = quality.DISTANCE_KEYS[metrics["modality"]]
    extra += [] if d is None else [f"  samples:   {key} {d[key]:.2f} to held-out items (training items: {d[key + '_train_vs_held_out']:.2f}), "
                 f"possible copies of a training item {m['possible_copies']:.0%}"]
    stacks = "" if "stages" not in p else (f", over the first {p['stages']} of {p['tokenizer_stages']} stages"
                                           + (f" ({p['bitrate_kbps']:.1f} kbps)" if "bitrate_kbps" in p else ""))
    recon = (f"{t['snr_db']:.2f} dB SNR, STOI {t.get('stoi', float('nan')):.2f}, {t['bitrate_kbps']:.1f} kbps" if "snr_db" in t
             else f"{t['psnr_db']:.2f} dB PSNR")
    return "\n".join([
        "",
        f"tokgen demo ({metrics['dataset']}) finished in {metrics['timing']['total_s']:.0f} s",
        f"  tokenizer: {recon} held-out, codebook usage {t['codebook_usage']:.2f}",
        f"  prior:     {p['bits_per_token']:.3f} bits/token, {p['bits_per_dim']:.4f} bits/dim held-out" + stacks,
        f"  sampling:  {s['tokens_per_s']:.0f} tokens/s" + "".join(f", {k} {v}" for k, v in knobs.items()),
        *extra,
        f"  look at:   {', '.join(str(out / f) for f in LOOK_AT[metrics['modality']])}, {out}/metrics.json",
        f"  pipeline:  {out / 'pipeline'}  (try: tokgen sample {out / 'pipeline'} --num 16"
        + "".join(f" --{k} {v}" for k, v in knobs.items()) + " --out more_samples)",
    ])


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> dict:
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen demo")
        add_arguments(parser)
        args = parser.parse_args(argv)
    metrics = run(args)
    emit(args, summary(metrics, args.out), metrics)
    return metrics
