"""Shared test setup: the tiny random models, pipelines and datasets every package's tests build, and the
fixtures that keep tests apart (one thread, fresh Accelerate state, a crash right after a checkpoint).

Tests are grouped by package (``tests/<package>/``); test modules take ``tiny`` for the factories.
"""
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

# Set before torch loads OpenMP (see pipelines/cli.py): tests run beside subprocesses they start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from pipelines.cli import main as tokgen_main  # noqa: E402
from pipelines.pipeline import TokgenPipeline  # noqa: E402
from stage1_tokenizer import (HierarchicalVQVAE, HierarchicalVQVAEConfig, QuantizerConfig, VQVAE,  # noqa: E402
                              VQVAEConfig)
from stage2_prior import TransformerPrior, TransformerPriorConfig  # noqa: E402


class TinyImages(Dataset):
    """``n`` random (channels, size, size) images labelled ``i % classes``, keys ``dir/img.{i:03d}.png``.

    ``noise`` adds torch-RNG noise to every item, as a random training crop would; ``fail_after`` makes the
    dataset raise after that many items (a simulated kill)."""

    def __init__(self, n: int = 50, *, seed: int = 123, size: int = 16, channels: int = 1, classes: int = 5,
                 noise: float = 0.0, fail_after: int | None = None):
        self.images = torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))
        self.labels = [i % classes for i in range(n)]
        self.noise, self.fail_after, self.calls = noise, fail_after, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated kill")
        x = self.images[i]
        if self.noise:
            x = (x + self.noise * torch.rand(x.shape)).clamp(0, 1)
        return {"x": x, "label": self.labels[i], "key": f"dir/img.{i:03d}.png", "skipped": []}


class Tiny:
    """Factories of tiny random models: seeded (``seed=None`` leaves torch's RNG as it is), in eval mode."""

    images = TinyImages

    @staticmethod
    def vqvae(seed: int | None = 0, *, codebook_size: int = 32, in_channels: int = 1, factors=(4, 4),
              modality: str = "image", **config) -> VQVAE:
        """A VQ-VAE with 8/8 channels, one res block and 8-d codes: 16x16 images -> 4x4 grids of 32 codes."""
        if seed is not None:
            torch.manual_seed(seed)
        quantizer = QuantizerConfig(codebook_size=codebook_size, dim=8, **config.pop("quantizer", {}))
        return VQVAE(VQVAEConfig(modality=modality, in_channels=in_channels, channels=(8, 8), num_res_blocks=1,
                                 factors=tuple(factors), quantizer=quantizer, **config)).eval()

    @staticmethod
    def hvqvae(seed: int | None = 0, *, codebook_size: int = 16, in_channels: int = 1, factors=((4, 4), (2, 2)),
               modality: str = "image", **config) -> HierarchicalVQVAE:
        """A 2-level VQ-VAE-2 with 8 channels: 32x32 images -> 4x4 top and 8x8 bottom grids of 16 codes."""
        if seed is not None:
            torch.manual_seed(seed)
        quantizer = QuantizerConfig(codebook_size=codebook_size, dim=8, **config.pop("quantizer", {}))
        return HierarchicalVQVAE(HierarchicalVQVAEConfig(
            modality=modality, in_channels=in_channels, channels=(8, 8), hidden=8, num_res_blocks=1,
            factors=tuple(tuple(f) for f in factors), quantizer=quantizer, **config)).eval()

    @staticmethod
    def transformer(seed: int | None = 0, *, grid=(4, 4), vocab: int = 32, num_classes: int = 0, dim: int = 16,
                    num_layers: int = 1, num_heads: int = 2, **config) -> TransformerPrior:
        if seed is not None:
            torch.manual_seed(seed)
        return TransformerPrior(TransformerPriorConfig(grid_shape=tuple(grid), vocab_size=vocab,
                                                       num_classes=num_classes, dim=dim, num_layers=num_layers,
                                                       num_heads=num_heads, **config)).eval()

    @staticmethod
    def prior_inputs(prior, batch: int = 2, seed: int = 1):
        """Random (codes (B, *grid), class labels (B,) or None, upper-level codes (B, *cond_grid) or None) for
        ``prior``'s config, from their own generator."""
        g = torch.Generator().manual_seed(seed)
        cfg = prior.config
        codes = torch.randint(0, cfg.vocab_size, (batch, *cfg.grid_shape), generator=g)
        labels = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
        cond = (torch.randint(0, cfg.cond_vocab_size, (batch, *cfg.cond_grid_shape), generator=g)
                if cfg.cond_vocab_size else None)
        return codes, labels, cond

    @staticmethod
    def scale_up(model, scale: float = 0.3):
        """Adds N(0, scale^2) noise to every weight (torch's RNG): larger weights than an init's, so that every
        input visibly moves the outputs. Returns the model, in eval mode."""
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
        return model.eval()

    @classmethod
    def pipeline(cls, seed: int = 0, *, num_classes: int = 3, size: int = 16, class_names: list[str] | None = None,
                 **prior) -> TokgenPipeline:
        """A tiny VQ-VAE on (1, size, size) images with a transformer prior over its (size/4)^2 grid; classes are
        named "0", "1", ... unless ``class_names`` says otherwise."""
        tokenizer = cls.vqvae(seed)
        grid = (size // 4, size // 4)
        names = class_names or [str(c) for c in range(num_classes)] or None
        return TokgenPipeline(tokenizer, [cls.transformer(seed, grid=grid, num_classes=num_classes, **prior)],
                              (1, size, size), names)


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    return Tiny()


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add contention on a shared 2-core machine (up to 100x slower).
    Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide singletons (each run builds its own Accelerator)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def accelerate_reset():
    """``reset_accelerate`` for module-scoped fixtures that train."""
    return reset_accelerate


@pytest.fixture
def fresh_accelerate():
    """Resets Accelerate's state after the test, so one run's settings do not leak into the next; yields the
    reset for tests that run several trainings."""
    yield reset_accelerate
    reset_accelerate()


def tokgen(*args) -> int:
    """``tokgen ARGS`` in-process (each argument ``str``-ed, so paths and numbers pass as they are); its exit code."""
    return tokgen_main([str(a) for a in args])


@pytest.fixture
def quiet_cli(monkeypatch, one_thread, fresh_accelerate):
    """Tests of the ``tokgen`` commands: no progress bars, no debug tracebacks, one thread, Accelerate reset after."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("TQDM_MININTERVAL", "20")  # cli.main would set it for the rest of the session
    monkeypatch.delenv("TOKGEN_DEBUG", raising=False)


class CheckpointCrash(Exception):
    """Raised by ``crash_after_checkpoint`` right after the armed checkpoint is on disk."""


@pytest.fixture
def crash_after_checkpoint(monkeypatch):
    """``arm(step)`` makes the next training run die with ``arm.error`` (``CheckpointCrash``) right after it
    has saved its step-``step`` checkpoint (a kill at the worst moment for resume); ``arm`` returns ``disarm``."""
    from harness import loop

    original = loop.save_checkpoint

    def arm(step: int):
        def save_then_crash(accelerator, run_dir, at, *args, **kwargs):
            folder = original(accelerator, run_dir, at, *args, **kwargs)
            if at == step:
                raise CheckpointCrash
            return folder

        monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
        return lambda: monkeypatch.setattr(loop, "save_checkpoint", original)

    arm.error = CheckpointCrash
    return arm


def launch_two_processes(test_file: str, worker: str, args: tuple = (), timeout: float = 300) -> None:
    """``accelerate.debug_launcher(worker, args, num_processes=2)`` for a module-level ``worker`` of ``test_file``,
    from a fresh interpreter: debug_launcher forks, and a fork of this pytest process (whose OpenMP pool, data
    loader and tensorboard threads have run earlier tests) can deadlock in the rendezvous."""
    file = Path(test_file).resolve()
    code = (f"import sys; sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(file.parent)!r}]; "
            f"from accelerate import debug_launcher; import {file.stem} as t; "
            f"debug_launcher(t.{worker}, args={tuple(args)!r}, num_processes=2)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-4000:]


class HostReads(TorchFunctionMode):
    """Records every call that would read a tensor back to the host on a GPU (and so empty its queue): ``item``,
    ``bool``/``int``/``float`` of a tensor, ``tolist``, ``nonzero``, ``bincount`` (its size), ``unique``,
    ``masked_select``, and indexing with a boolean mask. ``reads`` lists them as (call, "file:line" in tokgen).
    On the CPU nothing syncs, so this is how a CPU-only test sees what would stall a GPU."""

    CALLS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "nonzero", "bincount", "unique",
             "masked_select"}
    INDEXING = {"__getitem__", "__setitem__", "index_put", "index_put_"}

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.CALLS or (name in self.INDEXING and self._boolean_index(args)):
            self.reads.append((name, self._caller()))
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _boolean_index(args) -> bool:
        index = args[1] if len(args) > 1 else None
        parts = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts)

    @staticmethod
    def _caller() -> str:
        root = str(Path(__file__).resolve().parents[1])
        frames = [f for f in traceback.extract_stack()[:-3] if f.filename.startswith(root)]
        return f"{Path(frames[-1].filename).relative_to(root)}:{frames[-1].lineno}" if frames else "?"
