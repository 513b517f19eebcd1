"""The training loop both training scripts run, around Accelerate.

A run folder holds ``config.json`` (the resolved training config), ``checkpoints/`` (:mod:`harness.checkpoints`),
TensorBoard logs, pictures, ``skipped.txt`` (inputs that could not be read) and the final ``model/``.
A script plugs its train step, logs and checks into ``train_loop`` through ``LoopHooks``; the loop owns the
step count, logging, checkpoints, exact resume (:mod:`harness.data_order`) and the guard against
non-finite losses.
"""
from __future__ import annotations

import importlib.util
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, TorchDynamoPlugin
from tqdm.auto import tqdm

from harness.checkpoints import latest_valid_checkpoint, load_checkpoint, save_checkpoint
from harness.config import config_to_dict, load_config_file, merge
from harness.data_order import BatchStream
from harness.devices import keep_large_buffers_on_the_heap, resolve_mixed_precision
from harness.folders import write_json
from harness.output import add_output_arguments, log


# torch.compile's modes (None: Accelerate's choice)
DYNAMO_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainingConfig:
    """What every training script's config has: the optimiser, the step budget and the run's rhythm.

    ``open_run``, ``train_loop`` and ``optimizer_step`` read these fields; each script's config extends it.
    """

    batch_size: int = 32  # per process
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 50
    max_steps: int = 1000
    grad_accum: int = 1
    grad_clip: float = 1.0
    # no | fp16 | bf16 | auto (bf16 where the device runs it natively: a CUDA GPU with bf16, a CPU with AMX or
    # AVX512-BF16; else no); None = Accelerate's choice (`accelerate config`, `accelerate launch --mixed_precision`)
    mixed_precision: str | None = None
    # torch.compile the model with this backend through Accelerate (e.g. "inductor"); None = Accelerate's choice
    dynamo_backend: str | None = None
    # torch.compile's mode with dynamo_backend: default | reduce-overhead (CUDA graphs: the fastest on a GPU at
    # small batches, where launching kernels sets the pace) | max-autotune | max-autotune-no-cudagraphs;
    # None = Accelerate's choice (`accelerate config`, ACCELERATE_DYNAMO_MODE; else default)
    dynamo_mode: str | None = None
    # Accelerate tracker(s): "auto" = TensorBoard when installed, "none", or any tracker name ("wandb", "all", ...)
    log_with: str = "auto"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    num_workers: int = 0
    seed: int = 0
    max_bad_steps: int = 20  # non-finite losses in a row before the run stops


# ---- the command line both scripts share ---------------------------------------------------------
TRAINING_FLAGS = ("max_steps", "checkpoint_every", "batch_size", "lr", "seed", "mixed_precision", "grad_accum",
                  "num_workers", "log_with")


def add_training_arguments(p, defaults: dict[str, dict]) -> None:
    """The flags for ``TrainingConfig`` fields (``TRAINING_FLAGS``; not given = the config's value), plus --out,
    --config, --resume, --quiet and --json. ``defaults``: {preset name: its values}, quoted in the help so that
    every flag says what a run will use without it."""
    def default(field: str) -> str:
        fallback = getattr(TrainingConfig(), field)
        return "; ".join(f"{name}: {values.get(field, fallback)}" for name, values in defaults.items())

    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--config", help=f"JSON training config, or the name of a preset in harness/presets; its keys "
                                    f"override the default preset ({', '.join(defaults)})")
    flags = {"max_steps": (int, "optimizer steps to train for"),
             "checkpoint_every": (int, "optimizer steps between checkpoints"),
             "batch_size": (int, "samples per process per micro-batch"), "lr": (float, "peak learning rate"),
             "seed": (int, "seeds the model, the data order and every random crop"),
             "grad_accum": (int, "micro-batches per optimizer step"), "num_workers": (int, "data-loading processes")}
    for field, (kind, text) in flags.items():
        p.add_argument(f"--{field.replace('_', '-')}", type=kind, help=f"{text} (default: the config's; {default(field)})")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16", "auto"],
                   help="autocast precision; auto: bf16 on a CUDA GPU with bf16 or a CPU with AMX or "
                        "AVX512-BF16, else no (default: "
                        "the config's when it sets one, else Accelerate's: `accelerate config` / `accelerate launch "
                        "--mixed_precision`)")
    p.add_argument("--log-with", help="tracker: auto (TensorBoard when installed), none, or an Accelerate tracker "
                                      "name such as wandb (default: auto)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest valid checkpoint, exactly, with the run's own config (only "
                        "--max-steps may change)")
    add_output_arguments(p)


def check_resume_flags(args, names: tuple[str, ...], stored: dict) -> None:
    """``--resume`` continues a run with its own config (``stored``): refuse the flags among ``names`` that would
    change it (the same command again with --resume is fine; only --max-steps may differ)."""
    def changes(name: str, value) -> bool:
        if name == "config":  # a config file changes the run when a key of it differs from the run's
            return merge(stored, load_config_file(value)) != stored
        if name == "unconditional":
            return stored.get("class_conditional", True) == bool(value)
        return str(stored.get(name)) != str(value)

    ignored = [f"--{name.replace('_', '-')}" for name in names if name != "max_steps"
               and getattr(args, name, None) not in (None, False) and changes(name, getattr(args, name))]
    if ignored:
        raise ValueError(f"--resume continues the run with its own config ({args.out / 'config.json'}): "
                         f"{', '.join(ignored)} would be ignored; only --max-steps may change (or start a new run)")


def given_flags(args, names: tuple[str, ...]) -> dict:
    """{field: value} of the flags among ``names`` (None where not given: the config's value stays)."""
    return {name: getattr(args, name) for name in names}


# ---- accelerator ------------------------------------------------------------------------------
def trackers(log_with: str | None) -> str | list | None:
    """What Accelerate's ``log_with`` gets: "auto" is TensorBoard when it is installed, else nothing."""
    if log_with in (None, "none", ""):
        return None
    if log_with == "auto":
        return "tensorboard" if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX") else None
    return log_with


def _reset_accelerate_state() -> None:
    """Forget the precision and compile backend of an earlier Accelerator in this process; the process group stays."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def _device_accelerate_picks() -> torch.device:
    """The device an Accelerator gets here, by Accelerate's own rules (`accelerate launch` flags,
    ACCELERATE_USE_CPU, then CUDA, MPS, the CPU): a throw-away one is built and its state forgotten. A bare
    ``PartialState()`` would not do: it ignores ACCELERATE_USE_CPU, so two launched CPU processes would each
    think they were the only one."""
    device = Accelerator(mixed_precision="no").device
    _reset_accelerate_state()
    return device


def make_accelerator(run_dir: Path, mixed_precision: str | None, grad_accum: int, log_with: str | None = "auto",
                     dynamo_backend: str | None = None, dynamo_mode: str | None = None) -> Accelerator:
    """An Accelerator that follows Accelerate's own conventions: the device and, unless given here, the precision
    and compile backend and mode come from `accelerate config` / `accelerate launch` (CUDA, then MPS, then the
    CPU)."""
    if dynamo_mode not in DYNAMO_MODES:
        raise ValueError(f"dynamo_mode must be one of {', '.join(m for m in DYNAMO_MODES if m)} (or unset), "
                         f"got {dynamo_mode!r}")
    # torch deprecates broadcast_buffers for forward_sync_buffers, which still syncs at init and is
    # not in older torch; the behaviour we need (no per-forward broadcast) is the same.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated", category=FutureWarning)
    # Buffers (EMA codebooks) must not be broadcast from rank 0 on every forward: that would hide a
    # desynchronised codebook instead of letting the checkpoint check catch it.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    # Accelerate keeps one state per process: a second run in the same process (the demo trains a tokenizer, then
    # priors) would silently keep the first run's precision and compile backend. The process group stays.
    _reset_accelerate_state()
    if mixed_precision == "auto":
        mixed_precision = resolve_mixed_precision(mixed_precision, _device_accelerate_picks())
    return Accelerator(
        mixed_precision=mixed_precision,
        # unset fields of the plugin read Accelerate's environment (`accelerate launch --dynamo_*`), as it would
        dynamo_plugin=TorchDynamoPlugin(backend=dynamo_backend, mode=dynamo_mode),
        gradient_accumulation_steps=grad_accum,
        log_with=trackers(log_with),
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        kwargs_handlers=[ddp],
        # Our schedules count optimizer steps: Accelerate's default would advance them once per process
        # per step, so a 2-process run would decay its learning rate twice as fast as a 1-process one.
        step_scheduler_with_optimizer=False,
    )


def open_run(run_dir: Path, cfg: TrainingConfig, tracker: str) -> tuple[Accelerator, TrainingConfig]:
    """Create the run folder and the Accelerator, write the resolved config (the precision Accelerate chose
    included), start the trackers with it as hyper-parameters. Returns the Accelerator and that config."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(run_dir, cfg.mixed_precision, cfg.grad_accum, cfg.log_with, cfg.dynamo_backend,
                                   cfg.dynamo_mode)
    if accelerator.device.type == "cpu":
        keep_large_buffers_on_the_heap()
    cfg = replace(cfg, mixed_precision=accelerator.mixed_precision)
    if accelerator.is_main_process:
        write_json(run_dir / "config.json", config_to_dict(cfg))
    accelerator.init_trackers(tracker, config=hyperparameters(config_to_dict(cfg)))
    return accelerator, cfg


def close_run(accelerator) -> None:
    """End a run on every process: wait for all, let go of the prepared models, then end the trackers and the
    process group. Call after the caller has dropped its own references to the prepared (wrapped) models.

    The order matters: DDP's reducer holds the gloo process group, and a reducer freed after
    ``end_training`` destroyed the group runs gloo's destructor with the GIL held; that destructor joins a worker
    thread which may be waiting for the GIL, and the process hangs (pytorch#56297). Freed first, the reducer only
    drops a reference; ``destroy_process_group`` then drops the last one through the group's Python binding, whose
    destructor releases the GIL (pytorch#154976)."""
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # forgets the prepared objects and collects the cycles that keep a wrapper alive
    accelerator.end_training()


def prepare(accelerator, *objects):
    """``accelerator.prepare(*objects)``, less the autocast Accelerate wraps around each model's ``forward`` in a
    mixed-precision run. The train steps autocast explicitly (``accelerator.autocast()``); everything else that
    calls a model (the held-out evaluations during and after training) then runs in fp32, as the saved weights
    do in ``evaluate-prior`` and ``compress``, so a bf16 run logs the held-out bits those commands report.
    The wrapper sits on the inner module under DDP/FSDP/compile; unwrapping without it edits that module."""
    prepared = accelerator.prepare(*objects)
    for obj in prepared if isinstance(prepared, tuple) else (prepared,):
        if isinstance(obj, torch.nn.Module):
            accelerator.unwrap_model(obj, keep_fp32_wrapper=False)
    return prepared


def full_state_dict(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights under the model's own names; call on every process (FSDP gathers the shards).

    ``accelerator.get_state_dict`` unwraps DDP and FSDP but keeps ``torch.compile``'s ``_orig_mod.`` prefix."""
    weights = accelerator.get_state_dict(model)
    return {k.replace("_orig_mod.", ""): v for k, v in weights.items()}


def hyperparameters(values: dict, prefix: str = "") -> dict:
    """A nested config as the flat scalars trackers take: ``model/quantizer/dim``; lists and None as text."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(hyperparameters(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


# ---- one optimizer step ---------------------------------------------------------------------------
class BadStepGuard:
    """Skips optimizer steps whose loss was not finite in any micro-batch on any process; stops the run after
    ``limit`` of them in a row. ``observe`` stays on the device; ``step_ok`` syncs once per optimizer step."""

    def __init__(self, limit: int):
        self.limit, self.in_row, self.total = limit, 0, 0
        self.bad: torch.Tensor | None = None  # any non-finite loss since the last optimizer step (on the device)

    def observe(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).reshape(1)
        self.bad = bad if self.bad is None else self.bad | bad

    def step_ok(self, accelerator) -> bool:
        bad = self.bad.float()
        self.bad = None
        bad = accelerator.reduce(bad, reduction="sum") if accelerator.num_processes > 1 else bad
        if not float(bad.item()):
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        if self.in_row > self.limit:
            raise RuntimeError(
                f"loss was not finite for {self.in_row} steps in a row ({self.total} in all): "
                "lower the learning rate, check the data, or try --mixed-precision no"
            )
        return False


def optimizer_step(accelerator, model, optimizer, scheduler, loss: torch.Tensor, guard: BadStepGuard,
                   grad_clip: float) -> bool:
    """Inside ``accelerator.accumulate``: backward; at accumulation boundaries skip the step (False) when a loss
    was not finite, else clip, step, advance the schedule (when there is one) once per optimizer step, and clear
    the gradients."""
    guard.observe(loss)
    accelerator.backward(loss)
    if not accelerator.sync_gradients:
        return True
    if not guard.step_ok(accelerator):
        optimizer.zero_grad(set_to_none=True)
        return False
    if grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return True


class SkipLog:
    """Counts unreadable inputs and lists them in ``RUN/skipped.txt``; fail-fast raises instead."""

    def __init__(self, run_dir: Path, policy: str, is_main: bool):
        if policy not in ("skip", "fail"):
            raise ValueError(f"bad-input policy must be 'skip' or 'fail', got {policy!r}")
        self.path, self.policy, self.is_main, self.count = Path(run_dir) / "skipped.txt", policy, is_main, 0

    def add(self, keys: list[str]) -> None:
        if not keys:
            return
        if self.policy == "fail":
            raise RuntimeError(f"unreadable inputs (policy 'fail'): {keys}")
        self.count += len(keys)
        if self.is_main:
            with open(self.path, "a") as f:
                f.writelines(k + "\n" for k in keys)


# ---- the loop ---------------------------------------------------------------------------------------
@dataclass
class LoopHooks:
    """What a training script plugs into the loop.

    step(batch) -> logs or None (skipped); extra_logs() -> values for the bar/trackers at log time;
    every_step(step) -> pictures etc.; sync_check() -> a message checked at each checkpoint.
    """

    step: Callable[[dict], dict | None]
    extra_logs: Callable[[], dict] = lambda: {}
    every_step: Callable[[int], None] = lambda step: None
    sync_check: Callable[[], str] | None = None


@dataclass
class LoopState:
    """Where a run stands: optimizer steps done, batches consumed, the data position and its two counters."""

    accelerator: Accelerator
    run_dir: Path
    cfg: TrainingConfig
    guard: BadStepGuard
    skips: SkipLog
    step: int = 0
    consumed: int = 0
    data_position: dict | None = None  # what BatchStream.position() said at the checkpoint resumed from

    def trainer_state(self, stream: BatchStream) -> dict:
        return {"batches": self.consumed, "data_position": stream.position(), "bad_steps": self.guard.total,
                "skipped_inputs": self.skips.count}


def train_loop(accelerator, run_dir: Path, cfg: TrainingConfig, dataset, collate,
               make_hooks: Callable[[BadStepGuard], LoopHooks], *, resume: bool, quiet: bool, desc: str,
               bad_input: str = "skip") -> int:
    """Resume (or not), stream the data from the right position, and take optimizer steps until
    ``cfg.max_steps``: log, picture, checkpoint. Returns the final step."""
    state = LoopState(accelerator, Path(run_dir), cfg, BadStepGuard(cfg.max_bad_steps),
                      SkipLog(Path(run_dir), bad_input, accelerator.is_main_process))
    resume_position(state, resume)
    stream = BatchStream(dataset, cfg.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes,
                         collate, cfg.num_workers, state.data_position or {"batches": state.consumed})
    return run_loop(state, make_hooks(state.guard), stream, desc=desc, quiet=quiet)


def run_loop(state: LoopState, hooks: LoopHooks, stream: BatchStream, *, desc: str, quiet: bool) -> int:
    accelerator, cfg = state.accelerator, state.cfg
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=quiet or not accelerator.is_main_process,
               desc=desc, dynamic_ncols=True)
    started, seen = time.perf_counter(), 0
    while state.step < cfg.max_steps:
        batch = next(stream)
        state.consumed += 1
        seen += 1
        state.skips.add(batch.get("skipped", []))
        logs = hooks.step(batch)
        if logs is None or not accelerator.sync_gradients:
            continue
        state.step += 1
        bar.update(1)
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            logs = {k: float(v) for k, v in logs.items()}  # the only host sync of the logged values
            logs.update(hooks.extra_logs(), skipped_inputs=state.skips.count, bad_steps=state.guard.total,
                        samples_per_s=seen * cfg.batch_size / (time.perf_counter() - started))
            accelerator.log(logs, step=state.step)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "usage", "bits_per_token")})
        hooks.every_step(state.step)
        if cfg.checkpoint_every and (state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps):
            checkpoint(state, hooks, stream)
    bar.close()
    return state.step


def checkpoint(state: LoopState, hooks: LoopHooks, stream: BatchStream) -> None:
    """The script's sync check (when it has one), then an atomic checkpoint."""
    if hooks.sync_check is not None:
        message = f"step {state.step}: {hooks.sync_check()}"
        if state.accelerator.is_main_process:
            log.info(message)
    save_checkpoint(state.accelerator, state.run_dir, state.step, state.trainer_state(stream),
                    keep=state.cfg.keep_checkpoints)


def resume_position(state: LoopState, resume: bool) -> None:
    """Restore the step, the consumed batches and the counters from the latest valid checkpoint."""
    if not resume:
        return
    folder = latest_valid_checkpoint(state.run_dir)
    if folder is None:
        if state.accelerator.is_main_process:
            log.info(f"no checkpoint in {state.run_dir}; starting from scratch")
        return
    saved = load_checkpoint(state.accelerator, folder)
    state.guard.total, state.skips.count = saved.get("bad_steps", 0), saved.get("skipped_inputs", 0)
    state.step, state.consumed = saved["step"], saved["batches"]
    state.data_position = saved.get("data_position")
    if state.accelerator.is_main_process:
        log.info(f"resumed from {folder} at step {saved['step']}")
