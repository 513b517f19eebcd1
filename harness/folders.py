"""Save and load models as folders: ``config.json`` + ``model.safetensors``.

Every model in tokgen has one config dataclass and a constructor that takes it. ``save_pretrained``
writes both files (atomically: a temporary folder renamed into place) and ``from_pretrained`` rebuilds
the model with no flags. Weights only ever come from safetensors, never from pickles.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from harness.config import config_from_dict, config_to_dict, non_default_fields

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (a temporary file renamed into place), flushed to disk."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(value, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_dir(final: Path, write: typing.Callable[[Path], None]) -> None:
    """Run ``write(tmp_dir)`` then rename the folder to ``final``, replacing an old one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_config(path: str | os.PathLike) -> dict:
    """The config.json of a saved model folder, with a clear error when it is not one."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not a saved tokgen model folder")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err


class PretrainedMixin:
    """Adds ``save_pretrained``/``from_pretrained``/``fingerprint`` to an ``nn.Module`` with a ``config``.

    Subclasses set ``config_class`` and ``model_type`` (the name stored in config.json that says what a
    folder holds; ``legacy_model_types`` lists names older releases wrote for the same model).
    """

    config_class: type
    model_type: str
    legacy_model_types: tuple[str, ...] = ()

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Write the folder; ``state_dict``: the full weights when they are sharded across processes (FSDP:
        ``accelerator.get_state_dict(model)``), else the module's own."""
        def write(tmp: Path) -> None:
            config = {"model_type": self.model_type, **config_to_dict(self.config)}
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            weights = self.state_dict() if state_dict is None else state_dict
            state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"model_type": self.model_type})

        atomic_write_dir(Path(path), write)

    @classmethod
    def holds(cls, model_type: str | None) -> bool:
        """Whether a folder whose config.json says ``model_type`` holds this class's model."""
        return model_type == cls.model_type or model_type in cls.legacy_model_types

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu"):
        path = Path(path)
        config = read_config(path)
        model_type = config.pop("model_type", None)
        if not cls.holds(model_type):
            raise ValueError(f"{path} holds a {model_type!r} model, not a {cls.model_type!r}")
        model = cls(config_from_dict(cls.config_class, config))
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: {path} is not a saved tokgen model")
        state = load_file(str(weights), device=str(map_location))
        model.load_state_dict(state, strict=True)
        return model.eval()

    def fingerprint(self) -> str:
        """Hex SHA-256 over the config's non-default fields and the exact weights: names a trained model.

        Fields at their default are left out, so a config field added in a later version (at a default
        that keeps the old behaviour) does not change the name of any model saved before it, and the
        token sets and pipelines that refer to that name keep working.
        """
        h = hashlib.sha256()
        h.update(json.dumps(non_default_fields(self.config), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
