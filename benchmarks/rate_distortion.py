"""Rate-distortion: tokgen as a lossy codec (tokenizer + prior + arithmetic coding) against classic codecs.

Method: the held-out split of the data the pipeline was trained on (default: the digits demo pipeline
at ``demo_out/pipeline`` and ``digits``' eval split, 300 images 1x32x32 in [0, 1]). Every image is
coded on its own, as ``tokgen compress`` does: the real file size, header included, and the PSNR of the
decoded result against the float original (each file is decompressed and its codes checked). The
baselines code the same images quantized to 8 bits: PNG (Pillow, ``optimize=True``; lossless, so its
PSNR is that of the 8-bit quantization) and JPEG (Pillow, ``optimize=True``) at qualities 10/25/50/75/90. For an audio
pipeline the baselines are 16-bit PCM and FLAC (soundfile); for video each frame is a PNG/JPEG.
Bits per pixel = file bits / (H x W) (x T for video); for audio bits per sample.
PSNR = mean over images of 10 log10(peak^2 / MSE), peak 1 (2 for audio in [-1, 1]).

``python -m benchmarks.rate_distortion [--pipeline DIR] [--data SRC] [--limit N]``
"""
from __future__ import annotations

import argparse
import io
import math
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import ROOT, machine_info, table, write_result

DEFAULT_PIPELINE = ROOT / "demo_out" / "pipeline"
JPEG_QUALITIES = (10, 25, 50, 75, 90)


def _psnr(x: np.ndarray, y: np.ndarray, peak: float) -> float:
    mse = float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


# ---- baselines: each takes one float item (C, *S) and returns (bytes, decoded float array) -------------
def _to_uint8_frames(x: np.ndarray) -> list[np.ndarray]:
    """(C, H, W) or (C, T, H, W) in [0, 1] -> list of (H, W) or (H, W, 3) uint8 frames."""
    q = np.clip(np.round(x * 255), 0, 255).astype(np.uint8)
    frames = [q] if q.ndim == 3 else [q[:, t] for t in range(q.shape[1])]
    return [f[0] if f.shape[0] == 1 else np.moveaxis(f, 0, -1) for f in frames]


def _from_frames(frames: list[np.ndarray], like: np.ndarray) -> np.ndarray:
    arrs = [(f[None] if f.ndim == 2 else np.moveaxis(f, -1, 0)).astype(np.float64) / 255 for f in frames]
    return arrs[0] if like.ndim == 3 else np.stack(arrs, 1)


def _pil_codec(x: np.ndarray, fmt: str, **opts) -> tuple[int, np.ndarray]:
    from PIL import Image

    total, decoded = 0, []
    for frame in _to_uint8_frames(x):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format=fmt, **opts)
        total += buf.tell()
        buf.seek(0)
        with Image.open(buf) as img:
            decoded.append(np.asarray(img.convert("L" if frame.ndim == 2 else "RGB")))
    return total, _from_frames(decoded, x)


def _pcm16(x: np.ndarray, sample_rate: int, flac: bool) -> tuple[int, np.ndarray]:
    import soundfile as sf

    audio = np.clip(x.T, -1, 1)  # (T, C)
    if not flac:
        q = np.clip(np.round(audio * 32767), -32768, 32767)
        return q.size * 2, (q / 32767).T
    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate or 16000, format="FLAC", subtype="PCM_16")
    size = buf.tell()
    buf.seek(0)
    decoded, _ = sf.read(buf, dtype="float64", always_2d=True)
    return size, decoded.T


def baselines(modality: str, sample_rate: int = 0) -> dict:
    if modality == "audio":
        return {"16-bit PCM": lambda x: _pcm16(x, sample_rate, False),
                "FLAC (16-bit)": lambda x: _pcm16(x, sample_rate, True)}
    out = {"PNG (8-bit, optimize)": lambda x: _pil_codec(x, "PNG", optimize=True)}
    for q in JPEG_QUALITIES:
        out[f"JPEG q={q}"] = lambda x, q=q: _pil_codec(x, "JPEG", quality=q, optimize=True)
    return out


# ---- the benchmark ------------------------------------------------------------------------------------
def run(quick: bool = False, pipeline: Path | None = None, data: str = "digits", limit: int | None = None) -> dict:
    from data import build_dataset
    from data.common import iterate_items
    from data.modalities import value_span
    from pipelines.compress import coder_for
    from pipelines.evaluate import dataset_options
    from pipelines.pipeline import TokgenPipeline

    pipeline = Path(pipeline or DEFAULT_PIPELINE)
    if not (pipeline / "pipeline.json").is_file():
        msg = f"skipped: no pipeline at {pipeline} (run `make demo` first, or pass --pipeline)"
        print(msg)
        return {"title": "Rate-distortion: tokgen vs PNG/JPEG", "markdown": msg, "skipped": True}
    limit = limit or (40 if quick else None)
    torch.set_num_threads(1)  # sizes and PSNR do not depend on it; tiny models run fastest on one thread
    pipe = TokgenPipeline.from_pretrained(pipeline)
    sample_rate = pipe.tokenizer.sample_rate
    dataset = build_dataset(data, **dataset_options(pipe))
    peak = value_span(pipe.modality)
    coder = coder_for(pipe)
    codecs = baselines(pipe.modality, sample_rate)
    per_item = int(math.prod(pipe.input_shape[1:]))  # pixels (x frames) per item, or audio samples
    sizes = {"tokgen": [], "tokgen, model NLL (ideal code length, no header)": []}
    sizes.update({name: [] for name in codecs})
    psnrs = {name: [] for name in sizes}
    header_bytes, exact, started = None, True, time.perf_counter()
    for index, sample in enumerate(iterate_items(dataset)):
        if limit is not None and index >= limit:
            break
        x = sample["x"]
        label = [sample["label"]] if pipe.num_classes else None
        codes = [c.cpu() for c in pipe.encode(x[None])]
        enc = coder.encode(codes, tuple(x.shape), label)[0]
        dec = coder.decode([enc.blob])[0]
        exact &= all(torch.equal(a, b[0]) for a, b in zip(dec.codes, codes))
        recon = pipe.decode([c[None] for c in dec.codes])[0].cpu().numpy()
        xn = x.numpy()
        p = _psnr(xn, recon, peak)
        sizes["tokgen"].append(len(enc.blob))
        psnrs["tokgen"].append(p)
        sizes["tokgen, model NLL (ideal code length, no header)"].append(float(pipe.nll_bits(codes, label).sum()) / 8)
        psnrs["tokgen, model NLL (ideal code length, no header)"].append(p)
        header_bytes = enc.header_bytes
        for name, fn in codecs.items():
            size, decoded = fn(xn)
            sizes[name].append(size)
            psnrs[name].append(_psnr(xn, decoded, peak))
    n = len(sizes["tokgen"])
    if n == 0:
        raise ValueError(f"no held-out samples in {data!r}")
    unit = "bits/sample" if pipe.modality == "audio" else "bits/pixel"
    results, rows = [], []
    for name in sizes:
        s = np.asarray(sizes[name], dtype=np.float64)
        ps = np.asarray(psnrs[name])
        entry = {"codec": name, "bits_per_pixel": float(8 * s.mean() / per_item),
                 "bits_per_dim": float(8 * s.mean() / math.prod(pipe.input_shape)),
                 "bytes_per_item": float(s.mean()), "psnr_db": float(ps[np.isfinite(ps)].mean()),
                 "psnr_db_min": float(ps.min())}
        results.append(entry)
        rows.append([name, f"{entry['bits_per_pixel']:.3f}", f"{entry['psnr_db']:.2f}", f"{entry['bytes_per_item']:.1f}"])
    md = table(["codec", unit, "PSNR (dB)", "bytes/item"], rows)
    md += (f"\n\n{n} held-out items of `{data}` ({pipe.modality} {tuple(pipe.input_shape)}); tokgen files include their "
           f"{header_bytes}-byte header; decompressed codes equal the encoder's for all items: {exact}.")
    return {"title": f"Rate-distortion: tokgen vs {', '.join(codecs)}", "markdown": md, "codecs": results,
            "num_items": n, "data": data, "pipeline": str(pipeline), "fingerprint": pipe.fingerprint(),
            "input_shape": list(pipe.input_shape), "header_bytes": header_bytes, "round_trips_exact": exact,
            "seconds": round(time.perf_counter() - started, 1), "quick": quick}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rate_distortion", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", type=Path, help=f"pipeline folder (default {DEFAULT_PIPELINE})")
    p.add_argument("--data", default="digits", help="held-out data source (its eval split)")
    p.add_argument("--limit", type=int, help="at most this many items")
    p.add_argument("--quick", action="store_true", help="40 items")
    args = p.parse_args(argv)
    started = time.perf_counter()
    result = run(args.quick, args.pipeline, args.data, args.limit)
    print(result["markdown"])
    if not result.get("skipped"):
        command = "python -m benchmarks.rate_distortion " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
        path = write_result("rate_distortion", result, machine_info(), command.strip(), time.perf_counter() - started)
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
