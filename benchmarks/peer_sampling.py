"""Top-prior sampling of a 32x32 code map: rosinality's PixelSNAIL through its ``sample.py`` loop against
tokgen's cached priors of about its size (part of ``python -m benchmarks.peer_vqvae``; alone:
``python -m benchmarks.peer_sampling --peer PATH``).

The peer's loop (``sample_model`` in its ``sample.py``) runs the whole PixelSNAIL over the rows seen so far
for every position: position (i, j) costs one forward over rows 0..i. We time that forward, as the loop
calls it, at rows 0, 7, 15, 23 and 31 (interleaved repeats, medians) and add up the 1,024 steps by linear
interpolation between those rows; a whole peer sample at batch 8 on one CPU thread would take many minutes.
tokgen's priors sample the whole grid with their caches (``stage2_prior.sampling.sample``), timed in full.
The peer model is its top-prior configuration from ``train_pixelsnail.py``'s defaults (channel 256, 4 blocks
of 4 residual blocks, attention, kernel 5), untrained: speed does not depend on the weights.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from benchmarks.common import interleaved, median, table

ROWS = (0, 7, 15, 23, 31)
GRID = (32, 32)
VOCAB = 512


def peer_prior(peer_path: str):
    from benchmarks.peer_vqvae import add_peer_path

    add_peer_path(peer_path)
    from pixelsnail import PixelSNAIL  # noqa: E402  (the peer's module, on the path just added)

    # train_pixelsnail.py's defaults for the top prior: channel 256, n_res_block 4, n_res_channel 256, dropout 0.1
    return PixelSNAIL(list(GRID), VOCAB, 256, 5, 4, 4, 256, dropout=0.1, n_out_res_block=0).eval()


def tokgen_priors() -> dict:
    from stage2_prior.pixelcnn import GatedPixelCNNPrior, GatedPixelCNNPriorConfig
    from stage2_prior.transformer import TransformerPrior, TransformerPriorConfig

    # about the peer's 85M parameters
    pixelcnn = GatedPixelCNNPriorConfig(grid_shape=GRID, vocab_size=VOCAB, channels=320, num_layers=20, kernel_size=5,
                                        head_channels=640)
    transformer = TransformerPriorConfig(grid_shape=GRID, vocab_size=VOCAB, dim=768, num_layers=12, num_heads=12)
    return {"tokgen gated PixelCNN (cached)": GatedPixelCNNPrior(pixelcnn).eval(),
            "tokgen transformer (KV cache)": TransformerPrior(transformer).eval()}


def peer_step_seconds(model, batch: int, repeats: int) -> dict[int, float]:
    """Median seconds of the peer loop's forward at each row of ``ROWS``."""
    import torch

    codes = torch.zeros(batch, *GRID, dtype=torch.int64)

    def step(i):
        def run():
            with torch.no_grad():
                model(codes[:, : i + 1, :], condition=None, cache={})
        return run

    times = interleaved({i: step(i) for i in ROWS}, repeats=repeats, warmup=1)
    return {i: median(t) for i, t in times.items()}


def interpolated_total(per_row: dict[int, float]) -> float:
    """Seconds of the whole 32x32 loop: every row's step cost (linear between measured rows) times 32 columns."""
    rows = sorted(per_row)
    total = 0.0
    for i in range(GRID[0]):
        lo = max(r for r in rows if r <= i)
        hi = min(r for r in rows if r >= i)
        t = per_row[lo] if hi == lo else per_row[lo] + (per_row[hi] - per_row[lo]) * (i - lo) / (hi - lo)
        total += t * GRID[1]
    return total


def tokgen_sample_seconds(priors: dict, batch: int, repeats: int) -> dict[str, list[float]]:
    import torch

    from stage2_prior.sampling import sample

    def run(prior):
        def draw() -> None:  # None: ``interleaved`` times the call
            sample(prior, batch, generator=torch.Generator().manual_seed(0))
        return draw

    with torch.no_grad():
        return interleaved({name: run(p) for name, p in priors.items()}, repeats=repeats, warmup=1)


def worker(peer_path: str, batch: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    peer = peer_prior(peer_path)
    priors = tokgen_priors()
    per_row = peer_step_seconds(peer, batch, repeats)
    tokgen = tokgen_sample_seconds(priors, batch, repeats)
    params = {"rosinality PixelSNAIL (sample.py loop)": sum(p.numel() for p in peer.parameters())}
    params.update({name: sum(p.numel() for p in prior.parameters()) for name, prior in priors.items()})
    return {"batch": batch, "threads": 1, "grid": list(GRID), "parameters": params,
            "peer_step_s_at_row": {str(k): v for k, v in per_row.items()},
            "peer_total_s_interpolated": interpolated_total(per_row),
            "tokgen_total_s": {name: median(t) for name, t in tokgen.items()}, "tokgen_runs_s": tokgen}


def sampling_table(r: dict) -> str:
    peer_name = "rosinality PixelSNAIL (sample.py loop)"
    peer_s = r["peer_total_s_interpolated"]
    tokens = r["batch"] * GRID[0] * GRID[1]
    rows = [[peer_name, f"{r['parameters'][peer_name] / 1e6:.1f}M", f"{peer_s:,.0f} (interpolated)",
             f"{tokens / peer_s:.1f}", "1.00x"]]
    for name, s in r["tokgen_total_s"].items():
        rows.append([name, f"{r['parameters'][name] / 1e6:.1f}M", f"{s:.1f}", f"{tokens / s:.0f}", f"{peer_s / s:.0f}x"])
    steps = ", ".join(f"row {k}: {v:.3f} s" for k, v in r["peer_step_s_at_row"].items())
    return (table(["prior", "params", "seconds per 8 samples of 32x32", "tokens/s", "speed-up"], rows)
            + f"\n\nBatch {r['batch']}, one thread, untrained weights. The peer's step at {steps}.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer_sampling", description=__doc__.split("\n")[0])
    p.add_argument("--peer", required=True, help="a checkout of rosinality/vq-vae-2-pytorch")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(sampling_table(worker(args.peer, 8, args.repeats)))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        sys.exit(main())
