"""Prior training throughput on CPU: tokens/s of a training step for the shipped prior presets.

Method: a random-init tokenizer of the digits preset (``harness/presets/tokenizer-digits.json``: 32x32
inputs -> an 8x8 grid; codebook 128, and a copy with codebook 512 for the default preset, which is sized
for the 512-code image tokenizer) exports the built-in ``digits`` set with ``export_tokens``; then
``stage2_prior.train.build`` builds each prior preset (``prior-digits.json``: dim 128, 3 layers;
``prior-default.json``: dim 256, 8 layers; both class-conditional on the 10 digit labels, batch 32,
dropout 0.1) exactly as ``tokgen train-prior`` does, and ``stage2_prior.train.train_step`` (forward,
cross-entropy, backward, clipping, AdamW, schedule) runs on a fixed batch. Steps of the two presets
alternate (interleaved rounds); tokens/s = batch x 64 tokens / median step time. The FLOPs of a step
(``torch.utils.flop_counter``) over its median time give the achieved GFLOP/s, set against this machine's
measured peak (``benchmarks.common.peak_gflops``).
"""
from __future__ import annotations

import argparse
import itertools
import os
import tempfile
from pathlib import Path

import torch

from benchmarks.common import count_flops, interleaved, median, peak_gflops, table

PRESETS = {"prior-digits": 128, "prior-default": 512}  # preset -> codebook size of the tokens


def export_digits_tokens(out: Path, codebook_size: int) -> Path:
    from data import build_dataset
    from harness.config import preset
    from harness.config import config_from_dict
    from stage1_tokenizer.vqvae import VQVAE, VQVAEConfig
    from stage1_tokenizer.export import export_tokens

    values = preset("tokenizer-digits")["model"]
    values["quantizer"]["codebook_size"] = codebook_size
    torch.manual_seed(0)
    tokenizer = VQVAE(config_from_dict(VQVAEConfig, values))
    data = {split: build_dataset("digits", split=split, size=32, channels=1) for split in ("train", "eval")}
    export_tokens(tokenizer, data, out, progress=False)
    return out


def run(quick: bool = False) -> dict:
    from harness import loop
    from harness.config import preset
    from harness.config import config_from_dict
    from stage2_prior.train import PriorTrainConfig, build, collate, train_step

    repeats = 2 if quick else 10
    with tempfile.TemporaryDirectory(prefix="tokgen-bench-") as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")
        accelerator = loop.make_accelerator(tmp / "run", "no", 1, log_with="none")
        states, steps = {}, {}
        for name, vocab in PRESETS.items():
            tokens = export_digits_tokens(tmp / f"tokens-{vocab}", vocab)
            values = preset(name)
            values["tokens"] = str(tokens)
            cfg = config_from_dict(PriorTrainConfig, values)
            state = build(cfg, accelerator)
            state.model.train()
            # the token set streams (an IterableDataset since issue 15): the first batch of its order
            batch = collate(list(itertools.islice(iter(state.train_set), cfg.batch_size)))
            guard = loop.BadStepGuard(cfg.max_bad_steps)
            states[name] = (state, batch)
            steps[name] = (lambda s=state, b=batch, g=guard: train_step(s, b, accelerator, g) and None)
        times = interleaved(steps, repeats=repeats, warmup=2)
        flops = {name: count_flops(step) for name, step in steps.items()}
        peak = peak_gflops()
        rows, data = [], []
        for name, (state, batch) in states.items():
            model = accelerator.unwrap_model(state.model)
            cfg = model.config
            tokens = batch["codes"][0].numel() * batch["codes"].shape[0]
            step = median(times[name])
            params = sum(p.numel() for p in model.parameters())
            gflops = flops[name] / step / 1e9
            data.append({"preset": name, "dim": cfg.dim, "layers": cfg.num_layers, "heads": cfg.num_heads,
                         "vocab": cfg.vocab_size, "grid": list(cfg.grid_shape), "num_classes": cfg.num_classes,
                         "params": params, "batch": batch["codes"].shape[0], "tokens_per_step": tokens,
                         "step_s": times[name], "median_step_s": step, "tokens_per_s": tokens / step,
                         "train_flops": flops[name], "achieved_gflops": gflops, "peak_gflops": peak})
            rows.append([name, f"{cfg.dim}/{cfg.num_layers}/{cfg.num_heads}", f"{params / 1e6:.2f}M",
                         f"{cfg.grid_shape[0]}x{cfg.grid_shape[1]}, {cfg.vocab_size}", batch["codes"].shape[0],
                         repeats, f"{1000 * step:.0f}", f"{tokens / step:,.0f}", f"{flops[name] / 1e9:.1f}",
                         f"{gflops:.0f} ({100 * gflops / peak['peak']:.0f}%)"])
    md = table(["preset", "dim/layers/heads", "params", "grid, vocab", "batch", "timed steps", "median step ms",
                "tokens/s", "GFLOP per step", "GFLOP/s (of peak)"], rows)
    md += (f"\n\nFLOPs: one step under torch.utils.flop_counter. Peak (fp32, this process's threads): matmul "
           f"{peak['matmul']:.0f}, 3x3 conv {peak['conv3x3']:.0f} GFLOP/s; the larger is the reference.")
    return {"title": "Prior training throughput (CPU)", "markdown": md, "presets": data, "quick": quick}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    print(run(p.parse_args().quick)["markdown"])
