"""The same tokenizer trained with and without its discriminator (issue 17), on the same data, steps and seed.

``python -m benchmarks.adversarial [--parts photos,audio,video] [--out DIR] [--steps N] [--seed S] [--quick]``

``--set JSON`` changes the preset for both runs; ``--init-from MODEL`` makes both fine-tune a saved tokenizer (the
taming recipe's second phase) instead of training from scratch.

For each part, a shipped adversarial preset (``tokenizer-photos-gan``, ``tokenizer-spoken-digits-gan``,
``tokenizer-moving-digits-gan``) trains twice, one run after the other on the whole machine: as shipped, and with
``adversarial.weight`` 0 (everything else equal: the two runs are identical step for step until the
discriminator's ``disc_start``, tests/stage1_tokenizer/test_adversarial.py). Both are then measured on the
held-out split as ``tokgen evaluate-tokenizer`` measures them (benchmarks/PROTOCOL.md): photos on the 64x64 tiles
of the held-out photos, PSNR, SSIM, LPIPS and FD-VGG16 (originals against reconstructions); video per frame, and
FD-VGG16 on frames, on the first 50 held-out clips; audio on the 0.51 s held-out words, SNR, SI-SDR, STOI, the
multi-scale mel distance and kbps.
Pictures in DIR: ``photos_crop.png`` (a 96x96 crop of a held-out photo at full size, shown 3x: original,
without, with), ``video_frames.png`` (frame strips of one held-out clip), ``audio_spectrograms.png``.
Results: ``benchmarks/results/adversarial_PART.json`` (``.quick.json`` with ``--quick``: a smoke run of 8 steps).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine_info, machine_line, table, write_result
from data import PHOTOS_EVAL, build_dataset, load_photo
from data.files import center_crop_to_multiple
from data.pictures import save_image_grid, spectrogram_images
from harness.config import config_from_dict, config_to_dict, merge, preset
from stage1_tokenizer import evaluate as tokenizer_eval
from stage1_tokenizer import train
from stage1_tokenizer.registry import load_tokenizer


@dataclass(frozen=True)
class Part:
    preset: str  # the adversarial preset; the run without is the same with adversarial.weight 0
    eval_size: int | None  # held-out item size (None: the training size)
    metrics: tuple[str, ...]  # the columns of the table, from evaluate-tokenizer's metrics.json
    limit: int | None = None  # held-out items measured (None: all)


PARTS = {
    "photos": Part("tokenizer-photos-gan", 64, ("psnr_db", "ssim", "lpips", "fd_vgg16", "codebook_usage")),
    "audio": Part("tokenizer-spoken-digits-gan", 8192,
                  ("snr_db", "si_sdr_db", "stoi", "mel_distance_multiscale", "bitrate_kbps", "codebook_usage")),
    # the first 50 held-out clips: FD-VGG16 runs VGG16 on every frame (400 of them) twice
    "video": Part("tokenizer-moving-digits-gan", None,
                  ("psnr_db", "ssim", "lpips", "fd_vgg16_frames", "codebook_usage"), limit=50),
}
# the direction in which each metric is better (for the "wins" column)
HIGHER_IS_BETTER = {"psnr_db": True, "ssim": True, "lpips": False, "fd_vgg16": False, "fd_vgg16_frames": False,
                    "snr_db": True, "si_sdr_db": True, "stoi": True, "mel_distance_multiscale": False}


def configs(part: Part, steps: int | None, seed: int, overrides: dict | None = None,
            init_from: str | None = None) -> dict[str, train.TokenizerTrainConfig]:
    """{"without": ..., "with": ...}: the preset as shipped (``overrides`` merged in), and with its adversarial weight
    at 0; ``init_from``: both fine-tune that saved tokenizer instead of training from scratch."""
    values = merge(preset(part.preset), overrides or {})
    values.update(seed=seed, log_with="none", checkpoint_every=0, image_every=0)
    if init_from:
        values["init_from"] = init_from
    if steps:
        values["max_steps"] = steps
        adv = values["adversarial"]
        adv["disc_start"] = min(adv.get("disc_start", 0), steps // 2)
        adv["ramp_steps"] = min(adv.get("ramp_steps", 0), steps // 4)
    with_gan = config_from_dict(train.TokenizerTrainConfig, values)
    without = config_from_dict(train.TokenizerTrainConfig,
                               {**values, "adversarial": {**values["adversarial"], "weight": 0.0}})
    return {"without": without, "with": with_gan}


def train_and_measure(name: str, part: Part, cfg: train.TokenizerTrainConfig, out: Path, quiet: bool) -> dict:
    run = out / name
    started = time.perf_counter()
    train.train(cfg, run, quiet=quiet)
    train_s = time.perf_counter() - started
    argv = [str(run), "--data", cfg.data, "--out", str(run / "eval"), "--quiet"]
    if part.eval_size:
        argv += ["--size", str(part.eval_size)]
    if part.limit:
        argv += ["--limit", str(part.limit)]
    metrics = tokenizer_eval.main(argv)
    return {"train_s": round(train_s, 1), "metrics": metrics, "run": str(run)}


# ---- pictures ---------------------------------------------------------------------------------------
@torch.no_grad()
def photo_crop(runs: dict[str, Path], path: Path, size: int = 96, zoom: int = 3) -> None:
    """A crop of the first held-out photo at full size (encoded whole, then cropped), shown ``zoom`` x: original,
    without, with."""
    x = load_photo(PHOTOS_EVAL[0])[None]
    pictures = []
    for run in (None, *runs.values()):
        tokenizer = None if run is None else load_tokenizer(run)
        whole = center_crop_to_multiple(x[0], tokenizer.downsampling)[None] if tokenizer else x
        image = whole if tokenizer is None else tokenizer.reconstruct(whole)
        top, left = image.shape[-2] // 2 - size // 2, image.shape[-1] // 2 - size // 2
        crop = image[..., top:top + size, left:left + size]
        pictures.append(F.interpolate(crop, scale_factor=zoom, mode="nearest"))
    save_image_grid(torch.cat(pictures), path, nrow=len(pictures))


@torch.no_grad()
def held_out_strips(part_name: str, runs: dict[str, Path], path: Path) -> None:
    """Video: frame strips of one held-out clip (rows: original, without, with); audio: its spectrograms."""
    tokenizers = [load_tokenizer(run) for run in runs.values()]
    first = tokenizers[0]
    size = PARTS[part_name].eval_size
    cfg = json.loads((Path(next(iter(runs.values()))) / "config.json").read_text())
    options = {"frames": cfg["frames"], **cfg["data_options"]} if first.modality == "video" else {}
    dataset = build_dataset(cfg["data"], modality=first.modality, split="eval", size=size or cfg["size"],
                            channels=first.config.in_channels, sample_rate=first.sample_rate, **options)
    x = dataset[0]["x"][None]
    rows = [x] + [t.reconstruct(x) for t in tokenizers]
    if first.modality == "video":
        frames = torch.cat([r[0].transpose(0, 1) for r in rows])  # (3T, C, H, W)
        save_image_grid(frames, path, nrow=x.shape[2])
    else:
        save_image_grid(spectrogram_images(torch.cat(rows), first.sample_rate), path, nrow=1)


# ---- report ------------------------------------------------------------------------------------------
def rows_for(part_name: str, result: dict) -> list[list]:
    part, rows = PARTS[part_name], []
    for name in ("without", "with"):
        m = result[name]["metrics"]
        rows.append([part_name, name, result[name]["train_s"]] + [m.get(k, float("nan")) for k in part.metrics])
    return rows


def wins(part_name: str, result: dict) -> dict[str, bool]:
    """Per metric with a direction: whether the run with the discriminator is better."""
    a, b = result["without"]["metrics"], result["with"]["metrics"]
    return {k: (b[k] > a[k]) == HIGHER_IS_BETTER[k] for k in PARTS[part_name].metrics
            if k in HIGHER_IS_BETTER and k in a and k in b}


def run_part(part_name: str, out: Path, steps: int | None, seed: int, quiet: bool, overrides: dict | None = None,
             init_from: str | None = None) -> dict:
    part = PARTS[part_name]
    cfgs = configs(part, steps, seed, overrides, init_from)
    result = {name: train_and_measure(name, part, cfg, out / part_name, quiet) for name, cfg in cfgs.items()}
    runs = {name: Path(result[name]["run"]) for name in cfgs}
    if part_name == "photos":
        photo_crop(runs, out / "photos_crop.png")
    else:
        held_out_strips(part_name, runs, out / f"{part_name}_{'frames' if part_name == 'video' else 'spectrograms'}.png")
    result["config"] = config_to_dict(cfgs["with"])
    result["wins"] = wins(part_name, result)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.adversarial", description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="photos,audio,video", help="comma-separated: photos, audio, video")
    p.add_argument("--out", type=Path, default=Path("adversarial_bench"), help="run folders and pictures")
    p.add_argument("--steps", type=int, help="train this many steps instead of the presets' (the discriminator "
                                             "then starts at most halfway)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", type=json.loads, default={}, help="JSON merged into the preset for both runs, e.g. "
                   "'{\"lr\": 0.0002, \"adversarial\": {\"disc_start\": 0}}'")
    p.add_argument("--init-from", help="both runs fine-tune this saved tokenizer (one part at a time) instead of "
                                       "training from scratch")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 steps, not the reported numbers")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = [name for name in parts if name not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {sorted(PARTS)}")
    steps = 8 if args.quick else args.steps
    command = "python -m benchmarks.adversarial " + " ".join(argv if argv is not None else sys.argv[1:])
    info, results = machine_info(), {}
    print(f"Machine: {machine_line(info)}\n", flush=True)
    for name in parts:  # one result file per part, written as soon as the part is done
        started = time.perf_counter()
        results[name] = run_part(name, args.out, steps, args.seed, args.quiet, args.set, args.init_from)
        markdown = table(["part", "run", "train s", *PARTS[name].metrics], rows_for(name, results[name]))
        markdown += f"\n\nwith the discriminator better on: {results[name]['wins']}"
        write_result(f"adversarial_{name}" + (".quick" if args.quick else ""), {**results[name], "markdown": markdown},
                     info, command, time.perf_counter() - started)
        print(markdown + "\n", flush=True)
    return results


if __name__ == "__main__":
    main()
