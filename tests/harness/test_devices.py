"""Training precision ``auto``: bf16 exactly where the device runs it natively, every other value kept."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.devices import native_bf16, resolve_mixed_precision
from harness.loop import make_accelerator

CPU = torch.device("cpu")


def test_auto_is_bf16_exactly_where_the_device_runs_it_natively():
    assert resolve_mixed_precision("auto", CPU) == ("bf16" if native_bf16(CPU) else "no")
    assert resolve_mixed_precision("auto", torch.device("meta")) == "no"  # neither CUDA nor a CPU
    for kept in (None, "no", "fp16", "bf16"):
        assert resolve_mixed_precision(kept, CPU) == kept


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU's flags from /proc/cpuinfo")
def test_a_cpu_runs_bf16_natively_when_it_has_amx_or_avx512_bf16():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    assert native_bf16(CPU) == ("amx_tile" in flags and "amx_bf16" in flags or "avx512_bf16" in flags)


def _auto_worker(folder: str) -> None:
    accelerator = make_accelerator(Path(folder), "auto", 1, log_with="none")
    seen = {"processes": accelerator.num_processes, "main": accelerator.is_main_process,
            "precision": accelerator.mixed_precision}
    (Path(folder) / f"rank{accelerator.process_index}.json").write_text(json.dumps(seen))
    accelerator.end_training()


def _launch_auto(folder: str) -> None:
    from accelerate import debug_launcher

    debug_launcher(_auto_worker, args=(folder,), num_processes=2)


def test_auto_resolves_without_breaking_two_launched_cpu_processes(tmp_path):
    """Resolving auto asks Accelerate for the device before the run's Accelerator exists; that must not set up the
    process state itself (a bare PartialState ignores ACCELERATE_USE_CPU: each process thought it was alone)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_devices as t; "
            f"t._launch_auto({str(tmp_path)!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["processes"] for s in seen] == [2, 2] and [s["main"] for s in seen] == [True, False]
    assert {s["precision"] for s in seen} == {resolve_mixed_precision("auto", CPU)}


def test_prepare_leaves_forward_in_fp32_and_the_autocast_to_the_train_step(tmp_path):
    """``loop.prepare`` drops the autocast Accelerate wraps around forward in a bf16 run: called outside
    ``accelerator.autocast()`` (held-out evaluations) the prepared model computes exactly what the plain fp32 model
    does; inside it (the train steps) it still runs in bf16."""
    from harness.loop import prepare

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    x = torch.randn(4, 16)
    expected = plain(x)
    accelerator = make_accelerator(tmp_path, "bf16", 1, log_with="none")
    model = prepare(accelerator, plain)
    assert torch.equal(model(x), expected)
    with accelerator.autocast():
        assert model(x).dtype == torch.bfloat16
    accelerator.end_training()
