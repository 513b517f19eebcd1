"""Training configs: JSON files resolved against a preset, then overridden by command-line flags."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pipelines.hub import config_from_dict

T = TypeVar("T")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def preset(name: str) -> dict:
    """A config shipped in ``pipelines/configs`` (e.g. ``tokenizer-digits``)."""
    file = CONFIG_DIR / f"{name}.json"
    if not file.is_file():
        raise FileNotFoundError(f"no built-in config {name!r}")
    return json.loads(file.read_text())


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {path} is not valid JSON: {err}") from err


def merge(base: dict, override: dict) -> dict:
    """Deep merge: nested dicts merge key by key, other values replace."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve(cls: type[T], base: dict, file: str | None, flags: dict) -> T:
    """Preset <- config file <- flags that were given (None means not given)."""
    values = merge(base, load_config_file(file)) if file else base
    values = merge(values, {k: v for k, v in flags.items() if v is not None})
    return config_from_dict(cls, values)
