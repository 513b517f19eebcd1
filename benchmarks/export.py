"""Token export throughput against the tokenizer's encode alone, and export memory as the dataset grows.

Issue goals: ``export_tokens`` images/s >= 0.8x ``tokenizer.encode`` alone on the same images (reading
and writing must not dominate); the export's peak memory stays flat when the dataset grows 10x.

Method: a random-init tokenizer of the digits preset (``harness/presets/tokenizer-digits.json``: 1
channel, 32x32 -> 8x8 codes, codebook 128). A temporary folder holds N 32x32 grayscale PNGs (the
scikit-learn digits, upsampled, cycled, in 10 label subfolders), read through ``data.build_dataset(folder)``.
Five contenders run in interleaved rounds on the same images, batch 64, for N = 500 and N = 5,000, and we
quote medians:

* encode: ``tokenizer.encode`` on the images already decoded into one tensor (no I/O at all);
* read: decode the PNGs and collate batches, no encoding (the input I/O alone);
* read + encode: both, without writing anything;
* the same through export's own reader (``harness.data_order.SeededDataset`` in a ``DataLoader``: every item is
  loaded under its own ``torch.manual_seed``), still without writing;
* export: ``stage1_tokenizer.export.export_tokens`` into a fresh folder (read, encode, tar shards, sidecars,
  manifest, fsync), also with ``num_workers=1`` (decoding in a data-loader process, overlapped).

Memory: each of N and 10N is exported in a fresh subprocess; the peak-RSS high-water mark is reset after
the tokenizer and dataset exist (modules imported, one warm-up encode), and the figure is the high-water
mark (VmHWM) after ``export_tokens`` minus RSS before.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.common import interleaved, median, run_worker, table

BATCH = 64


def make_tokenizer():
    from harness.config import preset
    from harness.config import config_from_dict
    from stage1_tokenizer.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    return VQVAE(config_from_dict(VQVAEConfig, preset("tokenizer-digits")["model"])).eval()


def write_pngs(root: Path, n: int) -> Path:
    """n 32x32 grayscale PNGs in label subfolders, made from the digits set."""
    import numpy as np
    from PIL import Image

    from data import build_dataset

    digits = build_dataset("digits", split="train", size=32, channels=1)
    for label in range(10):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        item = digits[i % len(digits)]
        pixels = (item["x"][0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(root / str(item["label"]) / f"{i:06d}.png")
    return root


def dataset(folder: Path):
    from data import build_dataset

    return build_dataset(str(folder), split="train", size=32, channels=1)


def worker(folder: str, out: str) -> dict:
    from benchmarks.common import PeakRSS, apply_threads
    from stage1_tokenizer.export import export_tokens

    apply_threads()
    import tqdm.auto  # noqa: F401  (imported by export_tokens; not data-dependent memory)
    import webdataset  # noqa: F401

    tokenizer = make_tokenizer()
    ds = dataset(Path(folder))
    with torch.no_grad():  # warm-up: first-call allocations of the conv kernels
        tokenizer.encode(torch.stack([ds[i]["x"] for i in range(min(BATCH, len(ds)))]))
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        manifest = export_tokens(tokenizer, ds, out, batch_size=BATCH, progress=False)
        seconds = time.perf_counter() - t0
    return {"images": manifest["num_samples"], "seconds": seconds, **mem.as_dict()}


def run(quick: bool = False) -> dict:
    from data import collate_samples
    from stage1_tokenizer.export import export_tokens

    n = 100 if quick else 500
    plan = [(n, 2 if quick else 5, 1), (10 * n, 1 if quick else 3, 0)]  # (images, rounds, warm-up rounds)
    tokenizer = make_tokenizer()
    timings, memory = {}, []
    with tempfile.TemporaryDirectory(prefix="tokgen-bench-") as tmp:
        tmp = Path(tmp)
        folders = {size: write_pngs(tmp / f"png-{size}", size) for size, _, _ in plan}
        counter = [0]
        for size, repeats, warmup in plan:
            ds = dataset(folders[size])
            images = torch.stack([ds[i]["x"] for i in range(len(ds))])

            def encode(images=images):
                with torch.no_grad():
                    for b in range(0, len(images), BATCH):
                        tokenizer.encode(images[b : b + BATCH])

            def read(encode_too: bool, ds=ds):
                def fn():
                    with torch.no_grad():
                        for b in range(0, len(ds), BATCH):
                            batch = collate_samples([ds[i] for i in range(b, min(len(ds), b + BATCH))])
                            if encode_too:
                                tokenizer.encode(batch["x"])
                return fn

            def seeded_read_encode(ds=ds):
                # export's own input path: every item loaded under its own seed through SeededDataset
                from harness.data_order import SeededDataset
                from stage1_tokenizer.export import item_seed

                plan = [[(i, item_seed(0, i)) for i in range(b, min(len(ds), b + BATCH))]
                        for b in range(0, len(ds), BATCH)]
                loader = DataLoader(SeededDataset(ds), batch_sampler=plan, collate_fn=collate_samples)
                with torch.no_grad():
                    for batch in loader:
                        tokenizer.encode(batch["x"])

            def export(workers: int, ds=ds):
                def fn():
                    counter[0] += 1
                    out = tmp / f"tokens-{counter[0]}"
                    t0 = time.perf_counter()
                    export_tokens(tokenizer, ds, out, batch_size=BATCH, progress=False, num_workers=workers)
                    seconds = time.perf_counter() - t0
                    shutil.rmtree(out)
                    return seconds
                return fn

            fns = {"encode only (decoded tensors)": encode, "read only (PNG decode + collate)": read(False),
                   "read + encode": read(True),
                   "read via SeededDataset + DataLoader (as export does) + encode": seeded_read_encode,
                   "export_tokens": export(0),
                   "export_tokens, num_workers=1": export(1)}
            timings[size] = {"repeats": repeats, "times_s": interleaved(fns, repeats=repeats, warmup=warmup)}
        for size, _, _ in plan:
            memory.append(run_worker("benchmarks.export", [str(folders[size]), str(tmp / f"mem-{size}")]))
    rows, ratios = [], {}
    for size, entry in timings.items():
        speed = {name: size / median(t) for name, t in entry["times_s"].items()}
        entry["images_per_s"] = speed
        enc = speed["encode only (decoded tensors)"]
        ratios[size] = entry["export_vs_encode"] = speed["export_tokens"] / enc
        for name, t in entry["times_s"].items():
            rows.append([f"{size:,}", name, entry["repeats"], f"{median(t):.3f}", f"{speed[name]:,.0f}",
                         f"{speed[name] / enc:.2f}x"])
    md = table([f"N PNGs (32x32, batch {BATCH})", "contender", "rounds", "median s", "images/s", "vs encode only"], rows)
    md += "\n\n" + table(["export of", "peak RSS increase MiB", "RSS before MiB", "seconds"],
                         [[f"{m['images']:,} PNGs", f"{m['peak_increase_mib']:.1f}", f"{m['rss_before_mib']:.0f}",
                           f"{m['seconds']:.1f}"] for m in memory])
    growth = memory[1]["peak_increase_mib"] - memory[0]["peak_increase_mib"]
    worst = min(ratios.values())
    md += (f"\n\nGoal export >= 0.8x encode: {'met' if worst >= 0.8 else 'NOT met'} "
           f"({', '.join(f'{r:.2f}x at {s:,}' for s, r in ratios.items())}). "
           f"Peak memory from {n:,} to {10 * n:,} images: {growth:+.1f} MiB.")
    return {"title": "Token export", "markdown": md, "timings": timings, "export_vs_encode": ratios,
            "memory": memory, "memory_growth_mib": growth, "goal_met": worst >= 0.8, "quick": quick}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3])))
    else:
        p = argparse.ArgumentParser()
        p.add_argument("--quick", action="store_true")
        print(run(p.parse_args().quick)["markdown"])
