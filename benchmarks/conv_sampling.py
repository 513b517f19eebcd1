"""Sampling speed of the convolutional priors: cached (fast generation) vs full recompute per position.

    python -m benchmarks.conv_sampling [--repeats 3] [--nocache-positions 6] [--threads 1] [--device cpu] [--quick]

For each prior, ``stage2_prior.sampling.sample`` runs with ``use_cache=True`` (whole grid) and with
``use_cache=False``; the latter costs one full forward pass per position, so only its first N positions are
timed (stopped through the ``progress`` callback) and the time is extrapolated linearly to the whole grid
(every position costs the same full forward, so this is exact up to noise). Repeats are interleaved; the
table shows medians.

The floor for one cached step is the bytes it must read (the weights it applies to that position, the row
work amortized over the row, the cache entries it touches) divided by the memory bandwidth measured here
with a large tensor copy. Real steps on a CPU are far above it: a step is many tiny matrix-vector products,
each paying Python and operator dispatch overhead.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import interleaved, machine_info, machine_line, median, table, write_result
from stage2_prior.pixelcnn import GatedPixelCNNPriorConfig, GatedPixelCNNPrior
from stage2_prior.sampling import sample
from stage2_prior.wavenet import WaveNetPriorConfig, WaveNetPrior

NAME = "conv_sampling"


class _Stop(Exception):
    pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth(device: torch.device, mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large copy (read + write counted)."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / median(times[1:])


def _nbytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())


def pixelcnn_step_bytes(prior: GatedPixelCNNPrior, batch: int) -> float:
    """Bytes one cached step reads: per-position weights + taps, plus row work / W (see pixelcnn docstring)."""
    cfg, f = prior.config, 4
    c, w = cfg.channels, cfg.grid_shape[1]
    kw, kh = cfg.kernel_size // 2 + 1, cfg.kernel_size // 2 + 1
    per_token = sum(_nbytes(layer.h_conv, layer.out) for layer in prior.layers) + _nbytes(prior.head)
    per_token += len(prior.layers) * batch * (c * kw + 2 * c) * f  # horizontal taps + row bias column
    per_row = sum(_nbytes(layer.v_conv, layer.link, layer.ctx) for layer in prior.layers)
    per_row += len(prior.layers) * batch * c * kh * (w + 2 * (cfg.kernel_size // 2)) * f  # vertical row caches
    attn = _nbytes(*prior.attn.values()) + len(prior.attn) * 2 * batch * c * prior.num_tokens / 2 * f  # mean KV
    return per_token + per_row / w + attn


def wavenet_step_bytes(prior: WaveNetPrior, batch: int) -> float:
    cfg, f = prior.config, 4
    per_token = sum(_nbytes(layer.conv, layer.out, layer.ctx) for layer in prior.layers) + _nbytes(prior.head)
    # per layer the sum waiting for this position (2C values; as many as the k = 2 taps it stands for)
    return per_token + len(prior.layers) * batch * cfg.channels * cfg.kernel_size * f


def build(quick: bool):
    torch.manual_seed(0)
    px = GatedPixelCNNPriorConfig(grid_shape=(16, 16) if quick else (32, 32), vocab_size=512, channels=128,
                             num_layers=15, kernel_size=5)
    wn = WaveNetPriorConfig(grid_shape=(256,) if quick else (2048,), vocab_size=512, channels=64, skip_channels=128,
                       kernel_size=2, layers_per_cycle=10, num_cycles=3)
    return {
        "pixelcnn": (GatedPixelCNNPrior(px).eval(), pixelcnn_step_bytes, "15 layers, 128 ch, 5x5, V 512"),
        "wavenet": (WaveNetPrior(wn).eval(), wavenet_step_bytes, "30 layers (3 x 1..512), 64 res / 128 skip ch, k 2, V 512"),
    }


def bench(prior, batch: int, positions: int, repeats: int, device: torch.device) -> dict:
    n = prior.num_tokens
    positions = min(positions, n)

    def cached() -> float:
        sync(device)
        t0 = time.perf_counter()
        sample(prior, batch, generator=torch.Generator().manual_seed(0))
        sync(device)
        return time.perf_counter() - t0

    def recompute() -> float:
        done = [0]

        def progress(k):
            done[0] += k
            if done[0] >= positions:
                raise _Stop

        sync(device)
        t0 = time.perf_counter()
        try:
            sample(prior, batch, generator=torch.Generator().manual_seed(0), use_cache=False, progress=progress)
        except _Stop:
            pass
        sync(device)
        return (time.perf_counter() - t0) * n / positions  # extrapolated to all n positions

    times = interleaved({"cached": cached, "recompute": recompute}, repeats, warmup=1)
    return {"tokens": n, "recompute_positions_timed": positions,
            "cached_s": times["cached"], "recompute_s_extrapolated": times["recompute"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--nocache-positions", type=int, default=6, help="positions of the no-cache path to time")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared machine two threads make tiny steps 10-100x slower)")
    p.add_argument("--quick", action="store_true", help="small grids (16x16, 256) for a smoke run")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine_info()
    started = time.perf_counter()
    bw = bandwidth(device)
    rows, results = [], {}
    for name, (prior, step_bytes, arch) in build(args.quick).items():
        prior.to(device)
        with torch.no_grad():
            r = bench(prior, args.batch, args.nocache_positions, args.repeats, device)
        cached, full = median(r["cached_s"]), median(r["recompute_s_extrapolated"])
        step = cached / r["tokens"]
        nbytes = step_bytes(prior, args.batch)
        floor = nbytes / bw
        r.update(arch=arch, grid=list(prior.config.grid_shape), batch=args.batch,
                 cached_s_median=cached, recompute_s_median=full, speedup=full / cached,
                 cached_ms_per_step=step * 1e3, step_bytes=nbytes, floor_us_per_step=floor * 1e6,
                 step_over_floor=step / floor, params=sum(q.numel() for q in prior.parameters()))
        results[name] = r
        rows.append([name, "x".join(map(str, prior.config.grid_shape)), args.batch, cached, cached / args.batch,
                     full, full / cached, step * 1e3, nbytes / 2**20, floor * 1e6, step / floor])
        prior.cpu()
    cols = ["prior", "grid", "batch", "cached s/batch", "cached s/sample", "recompute s/batch (extrap.)",
            "speedup", "ms/step", "MiB read/step", "floor us/step", "step/floor"]
    command = "python -m benchmarks.conv_sampling " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    print(f"{machine_line(info)}; device {device}; copy bandwidth {bw / 1e9:.1f} GB/s")
    print(table(cols, rows))
    print(f"(recompute: first {args.nocache_positions} positions timed per repeat, extrapolated to the grid; "
          f"medians of {args.repeats} interleaved repeats)")
    result = {"device": str(device), "bandwidth_gb_s": bw / 1e9, "repeats": args.repeats, "results": results}
    path = write_result(NAME, result, info, command.strip(), time.perf_counter() - started)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
