"""What both training scripts share: Accelerate setup, run folders, atomic checkpoints, exact resume.

A run folder holds ``config.json`` (the resolved training config), ``checkpoints/step_XXXXXXXX/``
(``accelerator.save_state`` plus ``trainer.json`` and a checksum ``index.json``), TensorBoard logs,
pictures, ``skipped.txt`` (inputs that could not be read) and the final ``model/``.

Exact resume needs the data order to be a pure function of (seed, epoch, position): ``EpochBatches``
draws each epoch's permutation from its own generator and gives every sample its own seed, so neither
data-loader workers nor a restart in mid-epoch can change what a step sees.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

CHECKPOINT_RE = re.compile(r"^step_(\d{8})$")


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
    mixed_precision: str = "no"  # no | fp16 | bf16
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    num_workers: int = 0
    seed: int = 0
    max_bad_steps: int = 20  # non-finite losses in a row before the run stops


# ---- accelerator ------------------------------------------------------------------------------
def make_accelerator(run_dir: Path, mixed_precision: str, grad_accum: int, log: bool = True):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    # torch deprecates broadcast_buffers for forward_sync_buffers, which still syncs at init and is
    # not in older torch; the behaviour we need (no per-forward broadcast) is the same.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated", category=FutureWarning)
    # Buffers (EMA codebooks) must not be broadcast from rank 0 on every forward: that would hide a
    # desynchronised codebook instead of letting the checkpoint check catch it.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") in ("1", "true", "True")
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        log_with="tensorboard" if log else None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        kwargs_handlers=[ddp],
        # Our schedules count optimizer steps: Accelerate's default would advance them once per process
        # per step, so a 2-process run would decay its learning rate twice as fast as a 1-process one.
        step_scheduler_with_optimizer=False,
    )


def write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


# ---- deterministic, resumable data order -------------------------------------------------------
class SeededDataset(Dataset):
    """Wraps a map-style dataset; item (index, seed) runs ``dataset[index]`` under its own torch seed.

    Random crops and flips then depend only on the sample's seed, not on which worker loads it or on
    where a resumed run restarted.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also queue CUDA seeding, which costs
            # ~0.2 ms per item on CUDA builds and is not restored by fork_rng(devices=[]).
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


@dataclass
class EpochBatches:
    """Batches of (index, seed) for one rank: epoch e is a permutation seeded by (seed, e)."""

    size: int
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1

    def __len__(self) -> int:
        return (self.size // self.world) // self.batch_size

    def epoch(self, epoch: int, start: int = 0) -> list[list[tuple[int, int]]]:
        if len(self) == 0:
            raise ValueError(
                f"dataset of {self.size} samples is smaller than one batch of {self.batch_size} "
                f"x {self.world} processes"
            )
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.size, generator=g)
        seeds = torch.randint(0, 2**62, (self.size,), generator=g)
        mine = order[self.rank :: self.world][: len(self) * self.batch_size]
        pairs = [(int(i), int(seeds[i])) for i in mine]
        batches = [pairs[b : b + self.batch_size] for b in range(0, len(pairs), self.batch_size)]
        return batches[start:]


def batch_stream(dataset: Dataset, batch_size: int, seed: int, rank: int, world: int, collate,
                 num_workers: int = 0, start_batch: int = 0) -> Iterator[dict]:
    """Endless batches for one rank, starting after ``start_batch`` consumed batches.

    Map-style datasets follow ``EpochBatches``; iterable ones (WebDataset shards) are re-iterated each
    epoch and a resume skips the consumed batches by reading past them.
    """
    if isinstance(dataset, IterableDataset):
        yield from _iterable_stream(dataset, batch_size, collate, num_workers, start_batch)
        return
    plan = EpochBatches(len(dataset), batch_size, seed, rank, world)
    epoch, offset = divmod(start_batch, len(plan))
    wrapped = SeededDataset(dataset)
    while True:
        loader = DataLoader(wrapped, batch_sampler=plan.epoch(epoch, offset), collate_fn=collate,
                            num_workers=num_workers, generator=torch.Generator().manual_seed(seed + epoch))
        yield from loader
        epoch, offset = epoch + 1, 0


def _iterable_stream(dataset, batch_size, collate, num_workers, start_batch):
    consumed = 0
    while True:
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
                            drop_last=True)
        empty = True
        for batch in loader:
            empty = False
            consumed += 1
            if consumed > start_batch:
                yield batch
        if empty:
            raise ValueError("the dataset yielded no full batch: too few samples or unreadable shards")


# ---- checkpoints --------------------------------------------------------------------------------
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _index(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): _file_digest(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "index.json"
    }


def save_checkpoint(accelerator, run_dir: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """``accelerator.save_state`` into a temporary folder, checksum it, rename it into place.

    A run killed mid-write leaves only a ``.tmp`` folder, which resume ignores.
    """
    root = run_dir / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "trainer.json", {"step": step, **trainer_state})
        write_json(tmp / "index.json", _index(tmp))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def verify_checkpoint(folder: Path) -> str | None:
    """None when the checkpoint's files match its index, else what is wrong."""
    index_file = folder / "index.json"
    if not index_file.is_file():
        return "no index.json (partial write?)"
    try:
        expected = json.loads(index_file.read_text())
    except json.JSONDecodeError:
        return "index.json is corrupt"
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if _file_digest(path) != digest:
            return f"{name} does not match its checksum"
    return None


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose checksums hold; broken newer ones are reported and passed over."""
    for folder in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        warnings.warn(f"checkpoint {folder} is unusable ({problem}); falling back to an older one")
    return None


def load_checkpoint(accelerator, folder: Path) -> dict:
    """Restore model, optimizer, scheduler and RNG states; returns trainer.json."""
    accelerator.load_state(str(folder))
    return json.loads((folder / "trainer.json").read_text())


# ---- distributed checks -------------------------------------------------------------------------
def check_codebooks_in_sync(accelerator, model) -> str:
    """All-gather each quantizer's checksum; raise when ranks disagree."""
    from stage1_tokenizer.quantizer import VectorQuantizer

    quantizers = [m for m in accelerator.unwrap_model(model).modules() if isinstance(m, VectorQuantizer)]
    local = torch.stack([q.checksum() for q in quantizers]).to(accelerator.device)
    gathered = accelerator.gather(local[None]).view(accelerator.num_processes, -1)
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise RuntimeError(
            f"codebooks differ across {accelerator.num_processes} ranks (checksums {gathered.tolist()}): "
            "the EMA statistics are no longer synchronised; stopping"
        )
    return f"codebooks in sync across {accelerator.num_processes} ranks"


class BadStepGuard:
    """Skips steps whose loss is not finite; stops the run after ``limit`` of them in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_row, self.total = limit, 0, 0

    def ok(self, accelerator, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        finite = accelerator.reduce(finite, reduction="sum") if accelerator.num_processes > 1 else finite
        if int(finite.item()) == accelerator.num_processes:
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
    """Inside ``accelerator.accumulate``: skip a non-finite loss (False), else backward, clip at
    accumulation boundaries, step, advance the schedule once per optimizer step, clear gradients."""
    if not guard.ok(accelerator, loss):
        optimizer.zero_grad(set_to_none=True)
        return False
    accelerator.backward(loss)
    if accelerator.sync_gradients and grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if accelerator.sync_gradients:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return True


class SkipLog:
    """Counts unreadable inputs and lists them in ``RUN/skipped.txt``; fail-fast raises instead."""

    def __init__(self, run_dir: Path, policy: str, is_main: bool):
        if policy not in ("skip", "fail"):
            raise ValueError(f"bad-input policy must be 'skip' or 'fail', got {policy!r}")
        self.path, self.policy, self.is_main, self.count = run_dir / "skipped.txt", policy, is_main, 0

    def add(self, keys: list[str]) -> None:
        if not keys:
            return
        if self.policy == "fail":
            raise RuntimeError(f"unreadable inputs (policy 'fail'): {keys}")
        self.count += len(keys)
        if self.is_main:
            with open(self.path, "a") as f:
                f.writelines(k + "\n" for k in keys)


# ---- the loop both scripts run ------------------------------------------------------------------
@dataclass
class LoopHooks:
    """What a training script plugs into ``run_loop``.

    step(batch) -> logs or None (skipped); extra_logs() -> values for the bar/trackers at log time;
    every_step(step) -> pictures etc.; sync_check() -> a message checked at each checkpoint.
    """

    step: "Callable[[dict], dict | None]"
    extra_logs: "Callable[[], dict]" = lambda: {}
    every_step: "Callable[[int], None]" = lambda step: None
    sync_check: "Callable[[], str] | None" = None


def run_loop(accelerator, run_dir: Path, hooks: LoopHooks, stream: Iterator[dict], *, max_steps: int,
             batch_size: int, checkpoint_every: int, keep_checkpoints: int, log_every: int, start_step: int,
             consumed: int, guard: BadStepGuard, skips: SkipLog, desc: str, quiet: bool,
             count_key: str = "x") -> int:
    """Optimizer steps until ``max_steps``: log, picture, checkpoint. Returns the final step."""
    import time

    from tqdm.auto import tqdm

    step = start_step
    bar = tqdm(total=max_steps, initial=step, disable=quiet or not accelerator.is_main_process, desc=desc,
               dynamic_ncols=True)
    started, seen = time.perf_counter(), 0
    while step < max_steps:
        batch = next(stream)
        consumed += 1
        seen += 1
        skips.add(batch.get("skipped", []))
        logs = hooks.step(batch)
        if logs is None or not accelerator.sync_gradients:
            continue
        step += 1
        bar.update(1)
        if step % log_every == 0 or step == max_steps:
            logs.update(hooks.extra_logs(), skipped_inputs=skips.count, bad_steps=guard.total,
                        samples_per_s=seen * batch_size / (time.perf_counter() - started))
            accelerator.log(logs, step=step)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "usage", "bits_per_token")})
        hooks.every_step(step)
        if checkpoint_every and (step % checkpoint_every == 0 or step == max_steps):
            if hooks.sync_check is not None:
                message = f"step {step}: {hooks.sync_check()}"
                if accelerator.is_main_process:
                    bar.write(message)
            state = {"batches": consumed, "bad_steps": guard.total, "skipped_inputs": skips.count}
            save_checkpoint(accelerator, run_dir, step, state, keep=keep_checkpoints)
    bar.close()
    return step


def open_run(run_dir: Path, cfg, tracker: str):
    """Create the run folder and the Accelerator, write the resolved config, start the trackers."""
    from pipelines.hub import config_to_dict

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(run_dir, cfg.mixed_precision, cfg.grad_accum)
    if accelerator.is_main_process:
        write_json(run_dir / "config.json", config_to_dict(cfg))
    accelerator.init_trackers(tracker)
    return accelerator


def train_loop(accelerator, run_dir: Path, cfg, dataset, collate, make_hooks: Callable[[BadStepGuard], LoopHooks], *,
               resume: bool, quiet: bool, desc: str, bad_input: str = "skip") -> int:
    """Resume (or not), stream the data from the right position, and run ``run_loop`` with ``cfg``'s
    step budget, batch size, checkpoint and logging intervals. Returns the final step."""
    guard = BadStepGuard(cfg.max_bad_steps)
    skips = SkipLog(Path(run_dir), bad_input, accelerator.is_main_process)
    step, consumed = resume_position(accelerator, Path(run_dir), resume, guard, skips)
    stream = batch_stream(dataset, cfg.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes,
                          collate, cfg.num_workers, consumed)
    return run_loop(accelerator, Path(run_dir), make_hooks(guard), stream, max_steps=cfg.max_steps,
                    batch_size=cfg.batch_size, checkpoint_every=cfg.checkpoint_every,
                    keep_checkpoints=cfg.keep_checkpoints, log_every=cfg.log_every, start_step=step,
                    consumed=consumed, guard=guard, skips=skips, desc=desc, quiet=quiet)


def resume_position(accelerator, run_dir: Path, resume: bool, guard: BadStepGuard, skips: SkipLog) -> tuple[int, int]:
    """(step, consumed batches) from the latest valid checkpoint, or (0, 0)."""
    if not resume:
        return 0, 0
    folder = latest_valid_checkpoint(run_dir)
    if folder is None:
        accelerator.print(f"no checkpoint in {run_dir}; starting from scratch")
        return 0, 0
    saved = load_checkpoint(accelerator, folder)
    guard.total, skips.count = saved.get("bad_steps", 0), saved.get("skipped_inputs", 0)
    accelerator.print(f"resumed from {folder} at step {saved['step']}")
    return saved["step"], saved["batches"]
