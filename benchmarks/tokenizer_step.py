"""Tokenizer training step: images/s, peak memory, and the vector quantizer's share of the step.

Issue goals: report train-step images/s and peak memory at 64x64 and 256x256 on CPU; the quantizer's
share of a training step <= 10%.

Method: ``ONE_LEVEL_CONFIG``, the ``tokenizer-image`` preset as it was until issue 19 (one level, 3 channels,
widths 64/128/128, 2 res blocks, factors 8x8, codebook 512; the preset is now a compute-efficient hierarchical
model, measured against its peer in ``benchmarks/peer_vqvae.py``; this benchmark keeps the config its figures
were measured on) at 64x64 (batch 16) and 256x256 (batch 4), each size in a fresh subprocess.
A step is ``stage1_tokenizer.train.train_step`` as training runs it: forward, loss, backward, gradient
clipping, AdamW step, LR schedule (built by ``stage1_tokenizer.train.build``), on a fixed batch of real
``photos`` crops. After warm-up steps we time each step and quote the median.

Peak memory: the peak-RSS high-water mark (VmHWM) is reset (``/proc/self/clear_refs``) after the model,
optimizer and batch exist; the figure is the high-water mark after the steps minus RSS before them, so
it counts activations, gradients and AdamW state (allocated by the first step), not the weights. (Not
``getrusage`` ru_maxrss: in a subprocess it starts at the parent's peak, see ``benchmarks.common``.)

Quantizer share, two ways:
* in the step: forward hooks on ``model.quantizer`` time its forward (lookup, EMA update, restarts) and
  tensor hooks on its output ``z_q`` and its input ``z`` time its part of the backward (autograd runs
  the quantizer's nodes between the gradient reaching ``z_q`` and reaching ``z``); share = median
  (quantizer forward + backward) / median step;
* isolated: ``model.quantizer(z)`` forward + backward on the same ``z`` (the encoder output of the batch),
  timed in rounds interleaved with the steps, over the median step.
On a GPU (if one is there) the same runs go in bf16 autocast with device synchronisation around every
timer; otherwise that row is skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.common import median, run_worker, table

CASES = [(64, 16), (256, 4)]
ONE_LEVEL_CONFIG = {
    "arch": "vqvae",
    "model": {"modality": "image", "in_channels": 3, "channels": [64, 128, 128], "num_res_blocks": 2, "factors": [8, 8],
              "quantizer": {"codebook_size": 512, "dim": 64, "commitment_weight": 0.25, "ema": True, "decay": 0.99,
                            "restart_threshold": 1.0}},
    "data": "photos", "lr": 0.0005, "warmup_steps": 100, "max_steps": 20000,
}


class QuantizerTimer:
    """Time spent in a quantizer's forward and in its nodes of the backward, per step."""

    def __init__(self, quantizer, sync):
        self.sync, self.fwd, self.bwd = sync, 0.0, 0.0
        quantizer.register_forward_pre_hook(self._pre)
        quantizer.register_forward_hook(self._post)

    def reset(self) -> None:
        self.fwd = self.bwd = 0.0

    def _pre(self, module, args):
        self.sync()
        z = args[0]
        if z.requires_grad:
            z.register_hook(self._bwd_end)
        self.f0 = time.perf_counter()

    def _post(self, module, args, out):
        self.sync()
        self.fwd += time.perf_counter() - self.f0
        if out.z_q.requires_grad:
            out.z_q.register_hook(self._bwd_start)

    def _bwd_start(self, grad):
        self.sync()
        self.b0 = time.perf_counter()

    def _bwd_end(self, grad):
        self.sync()
        self.bwd += time.perf_counter() - self.b0


def worker(size: int, batch: int, warmup: int, steps: int, device: str) -> dict:
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    import tempfile

    import torch

    from benchmarks.common import PeakRSS, apply_threads
    from data import collate_samples
    from harness import loop
    from harness.config import config_from_dict
    from stage1_tokenizer.train import TokenizerTrainConfig, build, train_step

    apply_threads()
    values = dict(ONE_LEVEL_CONFIG)
    values.update(size=size, batch_size=batch, image_every=0)
    values["mixed_precision"] = "bf16" if device == "cuda" else "no"
    cfg = config_from_dict(TokenizerTrainConfig, values)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory(prefix="tokgen-bench-") as tmp:
        accelerator = loop.make_accelerator(Path(tmp), cfg.mixed_precision, 1, log_with="none")
        state = build(cfg, accelerator)
        torch.manual_seed(0)
        batch_data = collate_samples([state.dataset[i] for i in range(batch)])
        model = accelerator.unwrap_model(state.model)
        timer = QuantizerTimer(model.quantizer, sync)
        guard = loop.BadStepGuard(cfg.max_bad_steps)
        x = batch_data["x"].to(accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            z0 = model.encoder(model._to_model(x)).detach()
        grad_out = torch.randn_like(z0)

        def isolated() -> float:
            z = z0.clone().requires_grad_()
            sync()
            t0 = time.perf_counter()
            with accelerator.autocast():
                out = model.quantizer(z)
                loss = (out.z_q.float() * grad_out.float()).sum() + out.commitment_loss
            loss.backward()
            sync()
            return time.perf_counter() - t0

        step_s, q_fwd, q_bwd, q_iso = [], [], [], []
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as mem:
            for i in range(warmup + steps):
                timer.reset()
                sync()
                t0 = time.perf_counter()
                logs = train_step(state, batch_data, accelerator, guard)
                sync()
                elapsed = time.perf_counter() - t0
                if logs is None:
                    raise RuntimeError("the benchmark step was skipped (non-finite loss)")
                iso = isolated()
                if i >= warmup:
                    step_s.append(elapsed)
                    q_fwd.append(timer.fwd)
                    q_bwd.append(timer.bwd)
                    q_iso.append(iso)
    step = median(step_s)
    result = {
        "size": size, "batch": batch, "device": device, "mixed_precision": cfg.mixed_precision,
        "threads": torch.get_num_threads(), "warmup_steps": warmup, "timed_steps": steps,
        "step_s": step_s, "median_step_s": step, "images_per_s": batch / step,
        "quantizer_fwd_s": q_fwd, "quantizer_bwd_s": q_bwd, "quantizer_isolated_s": q_iso,
        "quantizer_share_in_step": median([f + b for f, b in zip(q_fwd, q_bwd)]) / step,
        "quantizer_share_isolated": median(q_iso) / step,
        "code_grid": list(z0.shape[2:]), "memory": mem.as_dict(),
    }
    if cuda:
        result["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run(quick: bool = False) -> dict:
    import torch

    runs_ = []
    plan = [("cpu", 64, 16, 1, 1 if quick else 5), ("cpu", 256, 1 if quick else 4, 1, 1 if quick else 3)]
    if torch.cuda.is_available():
        plan += [("cuda", s, b, 3, 5 if quick else 20) for s, b in CASES]
    for device, size, batch, warmup, steps in plan:
        runs_.append(run_worker("benchmarks.tokenizer_step", [str(size), str(batch), str(warmup), str(steps), device]))
    rows = []
    for r in runs_:
        mem = f"{r['memory']['peak_increase_mib']:,.0f}"
        if "cuda_peak_allocated_mib" in r:
            mem += f" (GPU {r['cuda_peak_allocated_mib']:,.0f} allocated)"
        rows.append([f"{r['size']}x{r['size']}", r["batch"], f"{r['device']} ({r['mixed_precision']})",
                     f"{r['timed_steps']}", f"{r['median_step_s']:.2f}", f"{r['images_per_s']:.2f}", mem,
                     f"{100 * r['quantizer_share_in_step']:.1f}%", f"{100 * r['quantizer_share_isolated']:.1f}%"])
    worst = max(max(r["quantizer_share_in_step"], r["quantizer_share_isolated"]) for r in runs_)
    md = table(["input", "batch", "device", "timed steps", "median step s", "images/s",
                "peak RSS increase MiB", "quantizer share (hooks in step)", "quantizer share (isolated)"], rows)
    if not torch.cuda.is_available():
        md += "\n\nGPU bf16 rows skipped: no CUDA device on this machine."
    md += f"\n\nGoal quantizer share <= 10%: {'met' if worst <= 0.10 else 'NOT met'} (worst {100 * worst:.1f}%)."
    return {"title": "Tokenizer train step (image preset)", "markdown": md, "runs": runs_,
            "goal_met": worst <= 0.10, "quick": quick}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        size, batch, warmup, steps, device = sys.argv[2:7]
        print(json.dumps(worker(int(size), int(batch), int(warmup), int(steps), device)))
    else:
        p = argparse.ArgumentParser()
        p.add_argument("--quick", action="store_true")
        print(run(p.parse_args().quick)["markdown"])
