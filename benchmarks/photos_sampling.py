"""Time per 256x256 sample of the photos pipeline (both levels), cached vs full recompute.

Uses a saved photos pipeline (``--pipeline``, e.g. the one ``tokgen demo --dataset photos`` writes) or,
without one, the same architecture from the shipped presets with random weights (speed does not
depend on the weights). The recompute path runs the full forward pass for every position; it is
timed over its first ``--positions`` positions per level and extrapolated linearly (each position
costs the same full forward). Both paths are also run in full at 64x64 to check they draw the same
codes. The per-token floor is the bytes a cached step must read over this machine's copy bandwidth.

    python -m benchmarks.photos_sampling [--pipeline demo_out_photos/pipeline] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import interleaved, machine_info, machine_line, median, table, write_result
from benchmarks.conv_sampling import _Stop, bandwidth, pixelcnn_step_bytes
from harness.config import preset
from harness.config import config_from_dict
from pipelines.pipeline import TokgenPipeline
from stage2_prior.sampling import sample


def random_photos_pipeline() -> TokgenPipeline:
    """The photos demo architecture (tokenizer and both PixelCNN priors) with random weights."""
    from stage1_tokenizer.hvqvae import HierarchicalVQVAE, HierarchicalVQVAEConfig
    from stage2_prior.pixelcnn import GatedPixelCNNPriorConfig, GatedPixelCNNPrior

    torch.manual_seed(0)
    tok = HierarchicalVQVAE(config_from_dict(HierarchicalVQVAEConfig, preset("tokenizer-photos")["model"]))
    top_shape, bottom_shape = tok.code_shapes((3, 64, 64))
    k = tok.codebook_sizes
    top = GatedPixelCNNPrior(GatedPixelCNNPriorConfig(grid_shape=top_shape, vocab_size=k[0],
                                                 **preset("prior-photos-top")["model"]))
    bottom = GatedPixelCNNPrior(GatedPixelCNNPriorConfig(grid_shape=bottom_shape, vocab_size=k[1], cond_grid_shape=top_shape,
                                                    cond_vocab_size=k[0], **preset("prior-photos-bottom")["model"]))
    return TokgenPipeline(tok, [top, bottom], (3, 64, 64))


def _recompute_seconds(prior, cond, positions: int) -> float:
    """Seconds of the no-cache path over the first ``positions`` positions, extrapolated to all."""
    done = [0]

    def progress(k):
        done[0] += k
        if done[0] >= positions:
            raise _Stop

    t0 = time.perf_counter()
    try:
        sample(prior, 1, cond=cond, generator=torch.Generator().manual_seed(0), use_cache=False, progress=progress)
    except _Stop:
        pass
    return (time.perf_counter() - t0) * prior.num_tokens / positions


def same_codes_at(pipe: TokgenPipeline, size: int) -> bool:
    small = pipe.with_input_shape((3, size, size))
    a = small.sample_codes(1, generator=torch.Generator().manual_seed(1))
    b = small.sample_codes(1, generator=torch.Generator().manual_seed(1), use_cache=False)
    return all(torch.equal(x, y) for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", type=Path)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--positions", type=int, default=64, help="recompute positions timed per level")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny per-token ops)")
    opts = p.parse_args(argv)
    torch.set_num_threads(opts.threads)
    started = time.perf_counter()
    pipe = TokgenPipeline.from_pretrained(opts.pipeline) if opts.pipeline else random_photos_pipeline()
    pipe = pipe.with_input_shape((3, opts.size, opts.size))
    top, bottom = pipe.priors
    top_codes = pipe.sample_codes(1, generator=torch.Generator().manual_seed(0))[0]

    def cached():
        t0 = time.perf_counter()
        pipe.sample_codes(1, generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - t0

    def recompute():
        return (_recompute_seconds(top, None, opts.positions)
                + _recompute_seconds(bottom, top_codes, opts.positions))

    times = interleaved({"cached": cached, "recompute": recompute}, opts.repeats, warmup=1)
    tokens = top.num_tokens + bottom.num_tokens
    bw = bandwidth(torch.device("cpu"))
    step_bytes = (pixelcnn_step_bytes(top, 1) * top.num_tokens + pixelcnn_step_bytes(bottom, 1) * bottom.num_tokens) / tokens
    cached_s, recompute_s = median(times["cached"]), median(times["recompute"])
    result = {
        "pipeline": str(opts.pipeline) if opts.pipeline else "random weights, photos presets",
        "size": opts.size, "grids": [list(top.config.grid_shape), list(bottom.config.grid_shape)], "tokens": tokens,
        "cached_s_per_sample": cached_s, "recompute_s_per_sample_extrapolated": recompute_s,
        "speedup": recompute_s / cached_s, "cached_ms_per_token": 1000 * cached_s / tokens,
        "floor_ms_per_token": 1000 * step_bytes / bw, "bytes_per_step": step_bytes, "bandwidth_gb_s": bw / 1e9,
        "same_codes_cached_vs_recompute_at_64px": same_codes_at(pipe, 64), "threads": opts.threads,
        "times": times,
    }
    info = machine_info()
    command = "python -m benchmarks.photos_sampling " + " ".join(argv or [])
    write_result("photos_sampling", result, info, command, time.perf_counter() - started)
    print(machine_line(info))
    print(table(["size", "tokens", "cached s/sample", "recompute s/sample (extrap.)", "speedup", "ms/token",
                 "floor ms/token", "same codes"],
                [[opts.size, tokens, cached_s, recompute_s, result["speedup"], result["cached_ms_per_token"],
                  result["floor_ms_per_token"], result["same_codes_cached_vs_recompute_at_64px"]]]))
    return result


if __name__ == "__main__":
    main()
