"""Shared helpers for the benchmarks: machine info, timing, peak-RSS subprocesses, tables, results."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
THREADS_ENV = "TOKGEN_BENCH_THREADS"  # set by ``benchmarks.run --threads N``; worker subprocesses inherit it


def apply_threads() -> int:
    """Use the torch thread count chosen with ``--threads`` (else torch's default); returns the count."""
    import torch

    if os.environ.get(THREADS_ENV):
        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    return torch.get_num_threads()


# ---- machine ------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    try:
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def machine_line(info: dict) -> str:
    gpu = f", GPU {info['cuda']}" if info.get("cuda") else ", no GPU"
    load = f", load average at start {info['loadavg_at_start'][0]}" if info.get("loadavg_at_start") else ""
    return (f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), {info['ram_gib']} GiB RAM"
            f"{gpu}; torch {info['torch']}, Python {info['python']}; {info['date']}{load}")


# ---- timing -------------------------------------------------------------------------------------
def median(values: list[float]) -> float:
    return float(statistics.median(values))


def interleaved(fns: dict[str, Callable[[], float | None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every function once per round, round after round, and collect the seconds each took.

    Interleaving makes a noisy machine (other work on shared cores) hit every contender alike. A function
    may return its own measured seconds (e.g. only part of what it ran); otherwise the call is timed.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            own = fn()
            elapsed = time.perf_counter() - t0 if own is None else own
            if r >= warmup:
                times[name].append(elapsed)
    return times


# ---- compute ------------------------------------------------------------------------------------
def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def median_gflops(fn, flops: float, repeats: int = 7, sync: Callable[[], None] = lambda: None) -> float:
    """GFLOP/s of ``fn`` (``flops`` a call), the median of ``repeats`` after one warm-up; ``sync`` waits for a
    device (e.g. ``torch.cuda.synchronize``) before each clock read."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return flops / median(times) / 1e9


def peak_gflops() -> dict:
    """This machine's fp32 throughput on the current thread count: a 1536x1536 matmul (torch.mm) and a
    256-channel 3x3 conv on 32x32 maps (oneDNN), the larger of which is the peak a step is compared with
    (on AMD CPUs the BLAS behind torch.mm can run well below what oneDNN's convs reach)."""
    import torch

    n = 1536
    a, b = torch.randn(n, n), torch.randn(n, n)
    x, conv = torch.randn(8, 256, 32, 32), torch.nn.Conv2d(256, 256, 3, padding=1, bias=False)
    with torch.no_grad():
        mm = median_gflops(lambda: a @ b, 2 * n**3)
        cv = median_gflops(lambda: conv(x), 2 * 8 * 256 * 256 * 9 * 32 * 32)
    return {"matmul": mm, "conv3x3": cv, "peak": max(mm, cv)}


# ---- memory -------------------------------------------------------------------------------------
def rss_kib() -> int:
    """Current resident set size in KiB (VmRSS)."""
    m = re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else 0


def max_rss_kib() -> int:
    """The process's peak RSS so far in KiB: VmHWM from /proc/self/status, else getrusage ru_maxrss.

    ru_maxrss is not used where VmHWM exists: Linux carries the parent's high-water mark into a child
    across fork/vfork + exec (``signal->maxrss``), so a subprocess started by a big parent reports at
    least the parent's peak, and ``clear_refs`` does not reset that part.
    """
    m = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()) if Path("/proc/self/status").exists() else None
    return int(m.group(1)) if m else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> bool:
    """Reset the peak-RSS high-water mark to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``).

    Without it, a transient peak during imports would hide part of the increase we measure.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak RSS increase of a block: the high-water mark after it minus RSS before (mark reset first).

    Meant for a fresh subprocess that measures one thing: torch's allocator keeps freed memory, so
    a second measurement in the same process would read low.
    """

    def __enter__(self):
        self.reset = reset_peak_rss()
        self.before = rss_kib() if self.reset else max_rss_kib()
        return self

    def __exit__(self, *exc):
        self.peak = max_rss_kib()
        self.increase = self.peak - self.before
        return False

    def as_dict(self) -> dict:
        return {"rss_before_mib": self.before / 1024, "peak_rss_mib": self.peak / 1024,
                "peak_increase_mib": self.increase / 1024, "hwm_reset": self.reset}


def run_worker(module: str, args: list[str], timeout: float = 1800) -> dict:
    """Run ``python -m module --worker ARGS`` in a fresh process; it prints one JSON line last."""
    cmd = [sys.executable, "-m", module, "--worker", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- output -------------------------------------------------------------------------------------
def table(columns: list[str], rows: list[list]) -> str:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    return "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def write_result(name: str, result: dict, info: dict, command: str, seconds: float) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "command": command, "machine": info, "seconds": round(seconds, 1), **result}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
