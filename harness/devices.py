"""Where and in what precision inference runs: ``--device`` and ``--dtype`` for every command that runs a model;
and what training precision ``auto`` means on a device (``native_bf16``, ``resolve_mixed_precision``).

``auto`` picks CUDA, then Apple MPS, then the CPU. A dtype other than fp32 runs the networks under autocast;
the quantizer's distances, the spectral losses and the compression coder stay in fp32 / float64 whatever it is
(they switch autocast off themselves).
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): CUDA when available, else MPS, else the CPU; otherwise the device named, checked."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N, mps): {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use auto or cpu)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS is not available on this machine (use auto or cpu)")
    return device


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """fp32 | bf16 | fp16 (None = fp32) -> the torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` on ``device`` (a no-op context for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 convs and matmuls in hardware, faster than fp32: a CUDA GPU that supports bf16,
    or a CPU with AMX (Intel Xeon from Sapphire Rapids on) or AVX512-BF16 (AMD Zen 4 on, Intel Cooper Lake on), where
    oneDNN runs the tokenizer presets' train steps 1.6-2x as fast as in fp32 (BENCHMARKS.md §13). Anywhere else
    autocast to bf16 is emulated or not measured: False."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # torch 2.11-2.13 have no public query for these
        return any(bool(getattr(torch.cpu, query, lambda: False)())
                   for query in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return False


def resolve_mixed_precision(name: str | None, device: torch.device) -> str | None:
    """A training precision: ``auto`` is bf16 where ``native_bf16(device)``, else no; any other value is kept as it
    is (None: Accelerate's choice)."""
    if name != "auto":
        return name
    return "bf16" if native_bf16(device) else "no"


def add_device_arguments(p) -> None:
    p.add_argument("--device", default="auto", help="where the models run: auto (CUDA, then MPS, then CPU), cpu, "
                                                     "cuda, cuda:N or mps (default: auto)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="inference precision: bf16/fp16 run the networks under autocast; quantizer and coder stay "
                        "exact (default: fp32)")


# glibc's largest dynamic mmap threshold (4 Mi longs, 32 MiB on 64-bit), less room for the chunk header
_HEAP_WARMUP_BYTES = (32 << 20) - (1 << 16)


def keep_large_buffers_on_the_heap() -> None:
    """Let glibc serve CPU tensors up to 32 MiB from its heap instead of a fresh mmap each time.

    glibc mmaps every allocation above its mmap threshold (128 KiB at start) and unmaps it on free; it raises the
    threshold only after such a block is freed. Until then each training step on the CPU maps and faults in its
    activation buffers anew: 2-3 times the page faults and ~10% slower steps (BENCHMARKS.md §11b),
    unless something earlier happened to free a big block (loading a dataset into memory did). Freeing one
    32 MiB block now raises the threshold to its maximum. Other allocators (macOS, jemalloc) ignore it.
    """
    block = bytearray(_HEAP_WARMUP_BYTES)
    del block

