"""tokgen's image tokenizer side by side with rosinality/vq-vae-2-pytorch (the VQ-VAE-2 most people run).

``python -m benchmarks.peer_vqvae --peer PATH [--seconds 300] [--seeds 0,1] [--parts speed,quality,sampling]
[--quick] [--mixed-precision bf16] [--device cuda --parts speed] [--cases 256x128] [--dynamo-backend inductor [--dynamo-mode reduce-overhead]]``: PATH is a checkout of https://github.com/rosinality/vq-vae-2-pytorch
(its ``vqvae.py`` and ``pixelsnail.py`` are imported from there; nothing is vendored).

Four parts; every tokgen figure of the first three comes from the shipped ``harness/presets/tokenizer-image.json``
(the preset a user's own folder gets) unless a row says otherwise:

* speed (one process, one thread, interleaved rounds): images/s of the train step (forward, loss, backward,
  optimizer step: tokgen's ``stage1_tokenizer.train.train_step``, the peer's MSE + 0.25 latent loss with
  Adam as its ``train_vqvae.py``), of encode (input -> codes) and of decode (codes -> image), at 64 px (batch
  16) and 256 px (batch 4); the FLOPs of each (``torch.utils.flop_counter``) and the achieved GFLOP/s against
  this machine's measured one-thread fp32 peak (``peak_gflops``). Rows: the peer's default ``VQVAE``, tokgen's preset,
  tokgen's earlier preset (the one the shipped preset replaced) and a tokgen hierarchical model of the peer's
  size with residual blocks at full resolution (what issue 19 measured first).
  A row at the peer's FLOPs: the shipped preset with two residual blocks per stage. ``--device cuda`` times the same
  rows on a GPU at batches that fill it (``GPU_SPEED_CASES``; ``--cases`` picks others), the GPU's peak measured
  beside them. ``--mixed-precision bf16``
  adds tokgen as ``--mixed-precision bf16`` trains it and the peer under bf16 autocast (its own training script has
  no mixed precision), every "vs peer" still against the peer as it ships; ``quality`` then trains tokgen in bf16.
  ``--dynamo-backend inductor`` adds the train step of each tokgen row in the run's precision (bf16 with
  ``--mixed-precision bf16``) compiled as the trainer's ``"dynamo_backend"``
  compiles it (Accelerate's ``torch.compile`` of the model; ``--dynamo-mode reduce-overhead``, the trainer's
  ``"dynamo_mode"``, adds CUDA graphs); its encode and decode stay eager, so those cells are left empty.
* presets: the train-step FLOPs per input (and per input value) of every shipped tokenizer preset, against the
  peer's per value of a 64x64x3 image.
* quality at equal wall-clock: the peer and tokgen train at the same time, one process and one thread each
  (so both see the same machine load), on random 64x64 crops of the built-in training photos, for the same
  number of seconds; then both reconstruct the held-out whole photos (coffee, chelsea; cropped to a multiple
  of 8): PSNR, LPIPS (AlexNet, the shared offline backbone) and the share of each level's codes in use.
  The two have the same code grids (4x and 8x downsampling, 512 codes per level).
* sampling: a 32x32 top-level code map from the peer's PixelSNAIL through its ``sample.py`` loop against
  tokgen's cached priors of about its size (``benchmarks/peer_sampling.py``).

Not in the default run, ``--parts precision``: tokgen's preset trained in fp32 and in bf16 at the same time, as the
quality part trains it (same seed and crops), and scored the same way. ``--parts ceiling`` (one thread, fp32): what
1.5x the peer's train-step images/s at the peer's FLOPs asks, 1.5x its achieved GFLOP/s, against the fastest single
3x3 conv layer, forward and backward, at widths 64-512 on the maps a 4x4-patch net runs at (size / 4 and size / 8,
NCHW and channels-last): no net made of such convs can run its whole step faster than its fastest layer does alone.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.tokenizer_step import ONE_LEVEL_CONFIG
from benchmarks.common import ROOT, count_flops, interleaved, machine_info, machine_line, median, median_gflops, \
    peak_gflops, run_worker, table, write_result

SPEED_CASES = [(64, 16), (256, 4)]
# A GPU needs batches large enough to fill it; each timed call there runs GPU_STEPS steps (launches run ahead)
GPU_SPEED_CASES = [(64, 256), (256, 32), (256, 128)]  # 256 px, batch 128: the peer's train_vqvae.py on one GPU
GPU_STEPS = 5
PEER_SIZED = {  # the peer's size (2.09M parameters against 1.39M), residual blocks at full resolution
    "arch": "hvqvae", "data": "photos", "lr": 0.0005, "warmup_steps": 100, "max_steps": 20000,
    "model": {"modality": "image", "in_channels": 3, "channels": [64, 64], "hidden": 64, "num_res_blocks": 2,
              "factors": [[4, 4], [2, 2]], "quantizer": {"codebook_size": 512, "dim": 64, "commitment_weight": 0.25,
                                                         "ema": True, "decay": 0.99, "restart_threshold": 1.0}},
}
PEER_LR = 3e-4  # train_vqvae.py's default
# The peer's default VQVAE's train step (forward and backward) on a 64x64x3 image, counted by ``--parts speed``
# (23.2 GFLOP a batch of 16, BENCHMARKS §13): what preset_cuts and the tests compare with, without its checkout.
PEER_TRAIN_FLOPS_PER_64PX_IMAGE = 23.2e9 / 16
PEER_LATENT_WEIGHT = 0.25  # train_vqvae.py's latent_loss_weight


# ---- the two models ---------------------------------------------------------------------------
def add_peer_path(path: str) -> None:
    """Put the peer's checkout first on ``sys.path`` (its modules import each other by their bare names)."""
    root = Path(path).resolve()
    if not (root / "vqvae.py").is_file() or not (root / "pixelsnail.py").is_file():
        raise SystemExit(f"--peer {path}: no vqvae.py/pixelsnail.py there; give a checkout of "
                         "rosinality/vq-vae-2-pytorch")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def import_peer(path: str):
    """The peer's ``VQVAE`` class from its checkout (``vqvae.py`` imports its own ``distributed`` package)."""
    add_peer_path(path)
    from vqvae import VQVAE  # noqa: E402  (the peer's module, found on the path just added)

    return VQVAE


def tokgen_config(values: dict, size: int, batch: int):
    """A whole training config (``{}``: the shipped preset) at this size and batch."""
    from harness.config import config_from_dict, preset
    from stage1_tokenizer.train import TokenizerTrainConfig

    merged = {**(values or preset("tokenizer-image")), "size": size, "batch_size": batch, "image_every": 0}
    return config_from_dict(TokenizerTrainConfig, merged)


class TokgenSide:
    """A tokgen tokenizer as its trainer builds and steps it."""

    def __init__(self, values: dict, size: int, batch: int, run_dir: Path, mixed_precision: str = "no",
                 dynamo_backend: str | None = None, dynamo_mode: str | None = None):
        from harness import loop
        from stage1_tokenizer.train import build

        self.cfg = tokgen_config(values, size, batch)
        # "bf16": the trainer's --mixed-precision bf16 (Accelerate's autocast; code choice stays fp32)
        self.accelerator = loop.make_accelerator(run_dir, mixed_precision, 1, log_with="none",
                                                 dynamo_backend=dynamo_backend, dynamo_mode=dynamo_mode)
        self.state = build(self.cfg, self.accelerator)
        self.model = self.accelerator.unwrap_model(self.state.model)
        self.guard = loop.BadStepGuard(self.cfg.max_bad_steps)

    def train_step(self, x) -> None:
        from stage1_tokenizer.train import train_step

        if train_step(self.state, {"x": x}, self.accelerator, self.guard) is None:
            raise RuntimeError("tokgen's step was skipped (non-finite loss)")

    def encode(self, x) -> list:
        with self.accelerator.autocast():
            return self.model.encode_levels(x)

    def decode(self, codes):
        with self.accelerator.autocast():
            return self.model.decode_levels(codes).float().clamp(0, 1)

    def parameters(self):
        return self.model.parameters()

    def eval(self):
        self.model.eval()


class PeerSide:
    """The peer's ``VQVAE`` with its training recipe; takes and gives images in [0, 1] like tokgen."""

    def __init__(self, vqvae_class, bf16: bool = False, device: str = "cpu"):
        import torch

        self.model = vqvae_class().to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=PEER_LR)
        # bf16: its forward under torch.autocast, which its train_vqvae.py does not do (a row for comparison)
        self.autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)

    def train_step(self, x) -> None:
        import torch.nn.functional as F

        x = x * 2 - 1  # the peer trains on images normalised to [-1, 1]
        self.optimizer.zero_grad()
        with self.autocast:
            recon, latent_loss = self.model(x)
        loss = F.mse_loss(recon.float(), x) + PEER_LATENT_WEIGHT * latent_loss.float().mean()
        loss.backward()
        self.optimizer.step()

    def encode(self, x) -> list:
        with self.autocast:
            _, _, _, top, bottom = self.model.encode(x * 2 - 1)
        return [top, bottom]

    def decode(self, codes):
        with self.autocast:
            return ((self.model.decode_code(*codes).float() + 1) / 2).clamp(0, 1)

    def parameters(self):
        return self.model.parameters()

    def eval(self):
        self.model.eval()


# ---- speed ------------------------------------------------------------------------------------
def matched_flops_values() -> dict:
    """The shipped image preset with two residual blocks per stage: 0.98x the peer's train-step FLOPs."""
    from harness.config import merge, preset

    return merge(preset("tokenizer-image"), {"model": {"num_res_blocks": 2}})


def speed_contenders(peer_path: str, size: int, batch: int, tmp: Path, mixed_precision: str = "no",
                     device: str = "cpu", dynamo_backend: str | None = None, dynamo_mode: str | None = None) -> dict:
    """The rows of the speed table. The peer as it ships (fp32) comes first: every "vs peer" is against it.

    ``mixed_precision="bf16"`` times tokgen as ``--mixed-precision bf16`` trains it, next to the same models
    in fp32 and the peer in both; the two slow earlier tokgen models are left out of that run, a GPU's and a
    compiled one.
    ``dynamo_backend`` adds a compiled twin of each tokgen row in ``mixed_precision`` (``compiled_name``).
    tokgen's sides are on the device Accelerate picks (a GPU where there is one), the peer's on ``device``."""
    vqvae_class = import_peer(peer_path)
    tokgen = {"tokgen tokenizer-image (shipped)": ({}, "no"),
              "tokgen matched FLOPs (2 blocks per stage)": (matched_flops_values(), "no")}
    if mixed_precision == "bf16":
        tokgen.update({"tokgen tokenizer-image, bf16": ({}, "bf16"),
                       "tokgen matched FLOPs, bf16": (matched_flops_values(), "bf16")})
    sides = {"rosinality VQVAE (default)": PeerSide(vqvae_class, device=device)}
    for i, (name, (values, precision)) in enumerate(tokgen.items()):
        if i == 2:  # the bf16 rows, after the peer under bf16 autocast
            sides["rosinality VQVAE, bf16 autocast"] = PeerSide(vqvae_class, bf16=True, device=device)
        sides[name] = TokgenSide(values, size, batch, tmp / f"t{i}", precision)
    compiled = {n: v for n, v in tokgen.items() if v[1] == mixed_precision} if dynamo_backend else {}
    for i, (name, (values, precision)) in enumerate(compiled.items()):
        sides[compiled_name(name, dynamo_backend)] = TokgenSide(values, size, batch, tmp / f"c{i}", precision,
                                                                dynamo_backend, dynamo_mode)
    if device != "cpu" or mixed_precision == "bf16" or dynamo_backend:
        return sides
    return {**sides, "tokgen earlier tokenizer-image": TokgenSide(ONE_LEVEL_CONFIG, size, batch, tmp / "b"),
            "tokgen peer-sized, full-resolution blocks": TokgenSide(PEER_SIZED, size, batch, tmp / "c")}


def compiled_name(name: str, backend: str) -> str:
    """The row of ``name``'s train step compiled with ``backend`` (its FLOPs are its eager twin's)."""
    return f"{name}, compiled ({backend})"


COMPILE_WARMUP_STEPS = 3  # compiling, and the one recompile when the annealed level-dropout rate first changes


def speed_worker(peer_path: str, size: int, batch: int, repeats: int, mixed_precision: str = "no",
                 device: str = "cpu", dynamo_backend: str | None = None, dynamo_mode: str | None = None) -> dict:
    import torch

    cpu = device == "cpu"
    if cpu:
        torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.rand(batch, 3, size, size, device=device)
    steps = 1 if cpu else GPU_STEPS
    with tempfile.TemporaryDirectory(prefix="tokgen-peer-") as tmp:
        sides = speed_contenders(peer_path, size, batch, Path(tmp), mixed_precision, device, dynamo_backend,
                                 dynamo_mode)
        fns, flops, params, compile_seconds = {}, {}, {}, {}
        eager_twin = {compiled_name(n, dynamo_backend): n for n in sides} if dynamo_backend else {}
        for name, side in sides.items():
            params[name] = sum(p.numel() for p in side.parameters())
            twin = eager_twin.get(name)
            if twin is not None:  # compiled: the train step only, its FLOPs its eager twin's
                compile_seconds[name] = _timed(lambda side=side: side.train_step(x), COMPILE_WARMUP_STEPS, device)()
                flops[f"{name}|train"] = flops[f"{twin}|train"]
                fns[f"{name}|train"] = _timed(lambda side=side: side.train_step(x), steps, device)
                continue
            with torch.no_grad():
                codes = side.encode(x)
            calls = {"train": lambda side=side: side.train_step(x),
                     "encode": lambda side=side: _no_grad(side.encode, x),
                     "decode": lambda side=side, codes=codes: _no_grad(side.decode, codes)}
            for key, fn in calls.items():
                flops[f"{name}|{key}"] = count_flops(fn)
                fns[f"{name}|{key}"] = _timed(fn, steps, device)
        times = interleaved(fns, repeats=repeats, warmup=1)
    return {"size": size, "batch": batch, "threads": 1 if cpu else None, "device": device,
            "mixed_precision": mixed_precision, "dynamo_backend": dynamo_backend,
            "dynamo_mode": (dynamo_mode or os.environ.get("ACCELERATE_DYNAMO_MODE", "default")) if dynamo_backend
            else None,
            "compile_seconds_per_warmup_step": compile_seconds, "parameters": params, "flops": flops,
            "seconds": times, "peak_gflops": peak_gflops() if cpu else gpu_peak_gflops(device)}


def _timed(fn, steps: int, device: str):
    """A function that runs ``fn`` ``steps`` times and returns the seconds per call (a GPU synced at both ends)."""
    import torch

    def sync():
        if device != "cpu":
            torch.cuda.synchronize(device)

    def run() -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        return (time.perf_counter() - t0) / steps
    return run


def gpu_peak_gflops(device: str) -> dict:
    """The GPU's fp32 throughput as both tools run it by default: an 8192 matmul (TF32 off, torch's default) and a
    256-channel 3x3 conv on 64 x 64 maps, batch 64 (cuDNN, TF32 allowed, torch's default for convolutions)."""
    import torch

    def rate(fn, flops):
        return median_gflops(fn, flops, repeats=5, sync=lambda: torch.cuda.synchronize(device))

    n = 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    x = torch.randn(64, 256, 64, 64, device=device)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(device)
    with torch.no_grad():
        mm = rate(lambda: a @ b, 2 * n**3)
        cv = rate(lambda: conv(x), 2 * 64 * 256 * 256 * 9 * 64 * 64)
    return {"matmul": mm, "conv3x3": cv, "peak": max(mm, cv)}


def _no_grad(fn, arg):
    import torch

    with torch.no_grad():
        fn(arg)


# ---- the fp32 ceiling at the peer's FLOPs ----------------------------------------------------------
CEILING_WIDTHS = (64, 128, 256, 512)


def conv_layer_rates(size: int, batch: int, repeats: int, widths: tuple[int, ...]) -> list[dict]:
    """GFLOP/s of one 3x3 conv layer (C -> C, bias), forward and backward (input and weight gradients), on the maps a
    4x4-patch net runs at: (batch, C, size / 4 or size / 8, same), in both memory layouts."""
    import torch

    rows = []
    for width in widths:
        for side in (size // 4, size // 8):
            for layout in (torch.contiguous_format, torch.channels_last):
                conv = torch.nn.Conv2d(width, width, 3, padding=1).to(memory_format=layout)
                x = torch.randn(batch, width, side, side).contiguous(memory_format=layout).requires_grad_()

                def step(conv=conv, x=x):
                    conv(x).sum().backward()
                rate = median_gflops(step, count_flops(step), repeats=repeats)
                rows.append({"width": width, "map": side, "channels_last": layout == torch.channels_last,
                             "gflops": rate})
    return rows


def ceiling_worker(peer_path: str, size: int, batch: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    peer, x = PeerSide(import_peer(peer_path)), torch.rand(batch, 3, size, size)
    peer_rate = median_gflops(lambda: peer.train_step(x), count_flops(lambda: peer.train_step(x)), repeats=repeats)
    return {"size": size, "batch": batch, "peer_train_gflops": peer_rate,
            "convs": conv_layer_rates(size, batch, repeats, CEILING_WIDTHS), "peak_gflops": peak_gflops()}


def ceiling_table(runs: list[dict], factor: float = 1.5) -> str:
    rows = []
    for r in runs:
        best = max(r["convs"], key=lambda c: c["gflops"])
        need = factor * r["peer_train_gflops"]
        layout = "channels-last" if best["channels_last"] else "NCHW"
        rows.append([f"{r['size']} px, batch {r['batch']}", f"{r['peer_train_gflops']:.0f}", f"{need:.0f}",
                     f"{best['gflops']:.0f} (C {best['width']}, {best['map']}x{best['map']}, {layout})",
                     f"{best['gflops'] / need:.2f}", f"{r['peak_gflops']['peak']:.0f}"])
    return (table(["input", "peer's train step GFLOP/s", f"{factor}x that", "fastest conv layer, fwd + bwd GFLOP/s",
                   "fastest layer / needed", "peak (fwd)"], rows)
            + "\n\nOne thread, fp32. A whole step at the peer's FLOPs runs no faster than its fastest layer: below "
              "1.00 in the fifth column, no net of these layers reaches the goal on this CPU in fp32.")


# ---- quality at equal wall-clock ---------------------------------------------------------------
def held_out_photos():
    """The held-out whole photos in [0, 1], each cropped to a multiple of 8 (both nets are convolutional)."""
    from data.builtin import PHOTOS_EVAL, load_photo

    photos = []
    for name in PHOTOS_EVAL:
        x = load_photo(name)
        h, w = (s // 8 * 8 for s in x.shape[-2:])
        photos.append((name, x[:, :h, :w].unsqueeze(0)))
    return photos


def score(side) -> dict:
    import torch

    from stage1_tokenizer.metrics import psnr
    from stage1_tokenizer.perceptual import PerceptualLoss

    side.eval()
    lpips = PerceptualLoss()
    rows, used = {}, None
    with torch.no_grad():
        for name, x in held_out_photos():
            codes = side.encode(x)
            recon = side.decode(codes)
            rows[name] = {"psnr": float(psnr(recon, x).mean()), "lpips": float(lpips(recon, x).mean())}
            seen = [set(c.flatten().tolist()) for c in codes]
            used = seen if used is None else [a | b for a, b in zip(used, seen)]
    n = len(rows)
    return {"photos": rows, "psnr": sum(r["psnr"] for r in rows.values()) / n,
            "lpips": sum(r["lpips"] for r in rows.values()) / n,
            "codes_used_top_first": [len(u) / 512 for u in used]}


def quality_worker(side_name: str, peer_path: str, seconds: float, seed: int, values: dict,
                   mixed_precision: str = "no") -> dict:
    import torch

    from data import collate_samples
    from data.builtin import PhotosDataset

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="tokgen-peer-") as tmp:
        side = PeerSide(import_peer(peer_path)) if side_name == "peer" else TokgenSide(values, 64, 16, Path(tmp),
                                                                                        mixed_precision)
        crops = PhotosDataset(split="train", size=64)
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            batch = collate_samples([crops[i] for i in range(16)])["x"]
            side.train_step(batch)
            steps += 1
        trained_s = time.perf_counter() - t0
        return {"side": side_name, "mixed_precision": "no" if side_name == "peer" else mixed_precision,
                "steps": steps, "seconds": trained_s, "seed": seed,
                "parameters": sum(p.numel() for p in side.parameters()), **score(side)}


def worker_process(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "benchmarks.peer_vqvae", "--worker", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"worker {proc.args} failed ({proc.returncode}):\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1])


def side_by_side(peer_path: str, seconds: float, seed: int, values: dict, mixed_precision: str = "no") -> list[dict]:
    """The peer (as it ships, fp32) and tokgen (in ``mixed_precision``) trained at the same time, one thread each."""
    return train_together([("peer", "no"), ("tokgen", mixed_precision)], peer_path, seconds, seed, values)


def train_together(sides: list[tuple[str, str]], peer_path: str, seconds: float, seed: int,
                   values: dict) -> list[dict]:
    """``quality_worker`` for each (side, mixed precision) at the same time, one process and one thread each."""
    procs = [worker_process(["quality", side, peer_path, str(seconds), str(seed), json.dumps(values), precision])
             for side, precision in sides]
    return [collect(p) for p in procs]


# ---- every shipped tokenizer preset ------------------------------------------------------------
def preset_input(cfg):
    """One input of the preset's training size: (1, C, L) audio, (1, C, T, H, W) video, (1, C, H, W) images."""
    import torch

    m = cfg.model_config
    if m.modality == "audio":
        return torch.rand(1, m.in_channels, cfg.size) * 2 - 1
    if m.modality == "video":
        return torch.rand(1, m.in_channels, cfg.frames, cfg.size, cfg.size)
    return torch.rand(1, m.in_channels, cfg.size, cfg.size)


def preset_flops() -> list[dict]:
    """Train-step FLOPs (forward + backward of the loss) per input and per input value of every tokenizer preset."""
    import torch

    from harness.config import config_from_dict, preset, preset_names
    from stage1_tokenizer.registry import TOKENIZERS
    from stage1_tokenizer.train import TokenizerTrainConfig

    rows = []
    for name in (n for n in preset_names() if n.startswith("tokenizer-")):
        cfg = config_from_dict(TokenizerTrainConfig, preset(name))
        torch.manual_seed(0)
        model = TOKENIZERS[cfg.arch][0](cfg.model_config)
        x = preset_input(cfg).repeat_interleave(2, dim=0)
        flops = count_flops(lambda: model(x).loss.backward()) / 2
        rows.append({"preset": name, "modality": cfg.model_config.modality, "input": list(x.shape[1:]),
                     "parameters": sum(p.numel() for p in model.parameters()), "train_flops": flops,
                     "train_flops_per_value": flops / x[0].numel()})
    return rows


def presets_table(rows: list[dict], peer_per_value: float) -> str:
    out = [[r["preset"], r["modality"], "x".join(map(str, r["input"])), f"{r['parameters'] / 1e6:.2f}M",
            f"{r['train_flops'] / 1e9:.2f}", f"{r['train_flops_per_value'] / 1e3:.0f}",
            f"{r['train_flops_per_value'] / peer_per_value:.2f}x"] for r in rows]
    return (table(["preset", "modality", "input", "params", "train GFLOP per input", "kFLOP per input value",
                   "vs peer per value"], out)
            + f"\n\nThe peer's default VQVAE: {peer_per_value / 1e3:.0f} kFLOP per input value (a 64x64x3 image).")


def presets_part(peer_path: str) -> dict:
    import torch

    peer, x = PeerSide(import_peer(peer_path)), torch.rand(2, 3, 64, 64)
    peer_per_value = count_flops(lambda: peer.train_step(x)) / x.numel()
    return {"rows": preset_flops(), "peer_train_flops_per_value": peer_per_value}


# ---- tables -----------------------------------------------------------------------------------
def speed_table(runs: list[dict]) -> str:
    rows = []
    for r in runs:
        peer = "rosinality VQVAE (default)"
        for name, params in r["parameters"].items():
            row = [f"{r['size']} px, batch {r['batch']}", name, f"{params / 1e6:.2f}M"]
            for key in ("train", "encode", "decode"):
                if f"{name}|{key}" not in r["seconds"]:  # a compiled row times the train step only
                    row += ["-", "-", "-"]
                    continue
                s, ps = median(r["seconds"][f"{name}|{key}"]), median(r["seconds"][f"{peer}|{key}"])
                gf = r["flops"][f"{name}|{key}"] / 1e9
                row += [f"{r['batch'] / s:.2f}", f"{ps / s:.2f}x", f"{gf:.1f} ({gf * 1e9 / r['flops'][f'{peer}|{key}']:.2f}x)"]
            train_gflops = r["flops"][f"{name}|train"] / median(r["seconds"][f"{name}|train"]) / 1e9
            row.append(f"{train_gflops:.0f} ({100 * train_gflops / r['peak_gflops']['peak']:.0f}%)")
            rows.append(row)
    columns = ["input", "model", "params", "train img/s", "vs peer", "train GFLOP", "encode img/s", "vs peer",
               "encode GFLOP", "decode img/s", "vs peer", "decode GFLOP", "train GFLOP/s (of peak)"]
    peaks = "; ".join(f"{r['size']} px worker: matmul {r['peak_gflops']['matmul']:.0f}, 3x3 conv "
                      f"{r['peak_gflops']['conv3x3']:.0f}" for r in runs)
    bf16 = any(r.get("mixed_precision") == "bf16" for r in runs)
    where = "One thread." if runs[0].get("device", "cpu") == "cpu" else f"On {runs[0]['device']}."
    if runs[0].get("dynamo_backend"):
        where += (f" Compiled rows: {runs[0]['dynamo_backend']}, mode {runs[0]['dynamo_mode']}, "
                  f"{COMPILE_WARMUP_STEPS} warm-up steps before timing.")
    return (table(columns, rows) + f"\n\n{where} GFLOP: per step of the batch (torch.utils.flop_counter; a "
            f"multiply-add is 2). Peak, measured in the same workers (fp32 GFLOP/s): {peaks}."
            + (" The bf16 rows are against that fp32 peak too, so they can read over 100%." if bf16 else "")
            + " " + matched_flops_ceiling(runs))


def matched_flops_ceiling(runs: list[dict], factor: float = 1.5) -> str:
    """What ``factor`` x the peer's train-step images/s at the peer's own FLOPs asks of a model: ``factor`` x the
    peer's achieved GFLOP/s, as a share of the measured fp32 peak."""
    peer = "rosinality VQVAE (default)|train"
    parts = []
    for r in runs:
        rate = r["flops"][peer] / median(r["seconds"][peer]) / 1e9
        peak = r["peak_gflops"]["peak"]
        parts.append(f"{r['size']} px: {factor * rate:.0f} GFLOP/s, {100 * factor * rate / peak:.0f}% of the peak "
                     f"(the peer runs at {100 * rate / peak:.0f}%)")
    return (f"In fp32, {factor}x the peer's train-step images/s at the peer's FLOPs means a whole step at {factor}x "
            f"its GFLOP/s: " + "; ".join(parts) + ".")


def quality_table(pairs: list[list[dict]]) -> str:
    rows = []
    for pair in pairs:
        for r in pair:
            name = "rosinality VQVAE" if r["side"] == "peer" else "tokgen tokenizer-image"
            rows.append([r["seed"], name + (", bf16" if r.get("mixed_precision") == "bf16" else ""),
                         f"{r['parameters'] / 1e6:.2f}M", r["steps"], f"{r['seconds']:.0f}",
                         f"{r['psnr']:.2f}", f"{r['lpips']:.4f}",
                         " / ".join(f"{u:.2f}" for u in r["codes_used_top_first"])])
    return table(["seed", "model", "params", "steps", "train s", "held-out PSNR dB", "held-out LPIPS",
                  "codes used (top / bottom)"], rows)


PARTS = ("speed", "presets", "quality", "sampling")
EXTRA_PARTS = ("precision", "ceiling")  # not in the default run


def run_all(peer_path: str, seconds: float, seeds: list[int], repeats: int, cases: list[tuple[int, int]],
            parts: tuple[str, ...] = PARTS, mixed_precision: str = "no", device: str = "cpu",
            dynamo_backend: str | None = None, dynamo_mode: str | None = None) -> dict:
    from benchmarks.peer_sampling import sampling_table

    result, md = {"title": "Side by side with rosinality/vq-vae-2-pytorch", "train_seconds": seconds}, []
    if "speed" in parts:
        result["speed"] = [run_worker("benchmarks.peer_vqvae", ["speed", peer_path, str(s), str(b), str(repeats),
                                                                   mixed_precision, device, dynamo_backend or "",
                                                                   dynamo_mode or ""])
                           for s, b in cases]
        md.append("### Speed\n\n" + speed_table(result["speed"]))
    if "presets" in parts:
        result["presets"] = presets_part(peer_path)
        md.append("### FLOPs of every shipped tokenizer preset\n\n" + presets_table(
            result["presets"]["rows"], result["presets"]["peer_train_flops_per_value"]))
    if "quality" in parts:
        result["quality"] = [side_by_side(peer_path, seconds, seed, {}, mixed_precision) for seed in seeds]
        md.append("### Held-out quality at equal wall-clock\n\n" + quality_table(result["quality"]))
    if "precision" in parts:
        result["precision"] = [train_together([("tokgen", "no"), ("tokgen", "bf16")], peer_path, seconds, seed, {})
                               for seed in seeds]
        md.append("### tokgen in fp32 and in bf16 at equal wall-clock\n\n" + quality_table(result["precision"]))
    if "ceiling" in parts:
        result["ceiling"] = [run_worker("benchmarks.peer_vqvae", ["ceiling", peer_path, str(s), str(b), str(repeats)])
                             for s, b in cases]
        md.append("### What 1.5x the peer at its FLOPs asks in fp32\n\n" + ceiling_table(result["ceiling"]))
    if "sampling" in parts:
        result["sampling"] = run_worker("benchmarks.peer_sampling", [peer_path, "8", str(max(2, repeats // 2))],
                                        timeout=7200)
        md.append("### Top-prior sampling, 32x32 codes\n\n" + sampling_table(result["sampling"]))
    result["markdown"] = "\n\n".join(md)
    return result


def worker_main(argv: list[str]) -> None:
    kind, rest = argv[0], argv[1:]
    if kind == "ceiling":
        result = ceiling_worker(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
    elif kind == "speed":
        result = speed_worker(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), rest[4], rest[5], rest[6] or None,
                              rest[7] or None)
    else:
        result = quality_worker(rest[0], rest[1], float(rest[2]), int(rest[3]), json.loads(rest[4]), rest[5])
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer_vqvae", description=__doc__.split("\n")[0])
    p.add_argument("--peer", required=True, help="a checkout of rosinality/vq-vae-2-pytorch")
    p.add_argument("--seconds", type=float, default=300, help="training time of each side (default 300)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds, one side-by-side pair each")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {', '.join(PARTS)} (the default), or precision: tokgen's preset "
                        "trained in fp32 and in bf16 at the same time, --seconds each; or ceiling: 1.5x the peer's "
                        "fp32 GFLOP/s against the fastest single conv layer")
    p.add_argument("--quick", action="store_true", help="smoke run: 20 s of training, 2 speed rounds at 64 px")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: the speed part on the GPU (batch 256 at 64 px, 32 and 128 at 256 px; 5 steps per timed "
                        "call; no thread limit)")
    p.add_argument("--cases", help="speed: comma-separated SIZExBATCH (default 64x16,256x4 on the CPU; "
                                    "64x256,256x32,256x128 on a GPU)")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                   help="bf16: tokgen as `--mixed-precision bf16` trains it (speed: beside fp32 and the peer in both; "
                        "quality: against the peer as it ships, fp32)")
    p.add_argument("--dynamo-backend", help="speed: add the train step of each tokgen row in --mixed-precision "
                                            "compiled with this torch.compile backend (e.g. inductor), as the "
                                            "trainer's dynamo_backend compiles it")
    p.add_argument("--dynamo-mode", choices=["default", "reduce-overhead", "max-autotune"],
                   help="with --dynamo-backend: torch.compile's mode, as the trainer's dynamo_mode (reduce-overhead: "
                        "CUDA graphs)")
    args = p.parse_args(argv)
    seconds, repeats = (20.0, 2) if args.quick else (args.seconds, 5)
    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.quick else None]
    info, t0 = machine_info(), time.perf_counter()
    parts = tuple(x.strip() for x in args.parts.split(",") if x.strip())
    if set(parts) - set(PARTS + EXTRA_PARTS):
        p.error(f"--parts: choose from {', '.join(PARTS + EXTRA_PARTS)}")
    if args.dynamo_mode and not args.dynamo_backend:
        p.error("--dynamo-mode goes with --dynamo-backend")
    if (args.device != "cpu" or args.dynamo_backend) and parts != ("speed",):
        p.error("--device cuda and --dynamo-backend time the speed part only: give --parts speed")
    cases = SPEED_CASES if args.device == "cpu" else GPU_SPEED_CASES
    if args.cases:
        cases = [tuple(int(v) for v in c.lower().split("x")) for c in args.cases.split(",")]
    result = run_all(args.peer, seconds, seeds, repeats, cases[:1] if args.quick else cases, parts,
                     args.mixed_precision, args.device, args.dynamo_backend, args.dynamo_mode)
    name = "peer_vqvae" + ("" if parts == PARTS else "." + "_".join(parts))
    name += "" if args.mixed_precision == "no" else "." + args.mixed_precision
    name += "" if args.device == "cpu" else "." + args.device
    name += "" if not args.dynamo_backend else "." + args.dynamo_backend
    name += "" if not args.dynamo_mode else "." + args.dynamo_mode
    name += "" if not args.cases else "." + args.cases.replace(",", "_")
    command = "python -m benchmarks.peer_vqvae " + " ".join(sys.argv[1:] if argv is None else argv)
    path = write_result(name + (".quick" if args.quick else ""), result, info, command,
                        time.perf_counter() - t0)
    print(f"# {result['title']}\n\n`{command}`\n\nMachine: {machine_line(info)}\n\n{result['markdown']}\n\n({path})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
    else:
        sys.exit(main())
