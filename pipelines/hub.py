"""Save and load models as folders: ``config.json`` + ``model.safetensors``.

Every model in tokgen has one config dataclass and a constructor that takes it. ``save_pretrained``
writes both files (atomically: a temporary folder renamed into place) and ``from_pretrained`` rebuilds
the model with no flags. Weights only ever come from safetensors, never from pickles.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

T = TypeVar("T")


def config_to_dict(config: Any) -> dict:
    """A dataclass config (possibly nested) as a JSON-ready dict; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls: type[T], values: dict) -> T:
    """Rebuild a (nested) config dataclass; unknown keys are an error, not silently dropped."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)} (known: {sorted(names)})")
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = _coerce(hints[key], value)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return config_from_dict(hint, value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            return _coerce(arg, value)
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        return tuple(value)
    if origin is list and isinstance(value, (list, tuple)):
        (arg,) = typing.get_args(hint) or (Any,)
        return [_coerce(arg, v) for v in value]
    return value


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


class PretrainedMixin:
    """Adds ``save_pretrained``/``from_pretrained`` to an ``nn.Module`` with a ``config`` dataclass.

    Subclasses set ``config_class`` and ``model_type`` (a short name stored in config.json so a folder
    can say what it holds).
    """

    config_class: type
    model_type: str

    def save_pretrained(self, path: str | os.PathLike) -> None:
        def write(tmp: Path) -> None:
            config = {"model_type": self.model_type, **config_to_dict(self.config)}
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"model_type": self.model_type})

        atomic_write_dir(Path(path), write)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu"):
        path = Path(path)
        config = read_config(path)
        model_type = config.pop("model_type", None)
        if model_type != cls.model_type:
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


def non_default_fields(config: Any) -> dict:
    """``config_to_dict(config)`` without the fields (nested ones too) that equal the class default."""
    try:
        defaults = config_to_dict(type(config)())
    except (TypeError, ValueError):  # a class without a valid default instance: keep every field
        defaults = {}
    return _changed(config_to_dict(config), defaults)


def _changed(values: dict, defaults: dict) -> dict:
    out = {}
    for key, value in values.items():
        if key in defaults and value == defaults[key]:
            continue
        if key in defaults and isinstance(value, dict) and isinstance(defaults[key], dict):
            value = _changed(value, defaults[key])
        out[key] = value
    return out


def read_config(path: str | os.PathLike) -> dict:
    """The config.json of a saved model folder, with a clear error when it is not one."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not a saved tokgen model folder")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
