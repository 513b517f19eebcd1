"""Config dataclasses <-> JSON, presets, and resolution (preset <- config file <- command-line flags).

Every model and training script has one config dataclass. ``config_from_dict`` rebuilds it from JSON with
its types checked (a JSON ``"ema": "false"`` is an error naming the field, not a truthy string), nested
dataclasses included; unknown keys are errors, never dropped. A class may list fields it renamed
(``renamed_fields = {"old": "new"}``): folders written under the old name still load, and fingerprints
keep using the old name so that the models they name keep their names.

Presets are the JSON files in ``harness/presets`` (``preset("tokenizer-digits")``); ``--config`` takes a
preset name or a file.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
PRESET_DIR = Path(__file__).resolve().parent / "presets"


# ---- dataclass <-> dict ------------------------------------------------------------------------
def config_to_dict(config: Any) -> dict:
    """A dataclass config (possibly nested) as a JSON-ready dict; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def renamed_fields(cls: type) -> dict[str, str]:
    """{old name: new name} of the fields ``cls`` renamed (its ``renamed_fields`` class attribute)."""
    return dict(getattr(cls, "renamed_fields", {}))


def config_from_dict(cls: type[T], values: dict) -> T:
    """Rebuild a (nested) config dataclass from JSON values, checking every value's type."""
    if not isinstance(values, dict):
        raise ValueError(f"{cls.__name__} must be given as a JSON object, got {values!r}")
    values = _new_names(cls, values)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = set(values) - set(names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)} (known: {sorted(names)})")
    kwargs = {key: _coerce(hints[key], value, f"{cls.__name__}.{key}") for key, value in values.items()}
    return cls(**kwargs)


def _new_names(cls: type, values: dict) -> dict:
    out = dict(values)
    for old, new in renamed_fields(cls).items():
        if old in out:
            if new in out:
                raise ValueError(f"{cls.__name__}: give {new!r} or its old name {old!r}, not both")
            out[new] = out.pop(old)
    return out


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """``value`` as the type ``hint`` asks for, or a ValueError naming ``where`` and the value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is not a {_type_name(hint)}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a JSON object of {hint.__name__} fields, got {value!r}")
        return config_from_dict(hint, value)
    if origin in (tuple, list):
        return _coerce_sequence(origin, args, value, where)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a JSON object, got {value!r}")
        return value
    return _coerce_scalar(hint, value, where)


def _coerce_sequence(origin, args, value, where):
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: expected a list, got {value!r}")
    if origin is list:
        (arg,) = args or (Any,)
        return [_coerce(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not args or (len(args) == 2 and args[1] is Ellipsis):
        arg = args[0] if args else Any
        return tuple(_coerce(arg, v, f"{where}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ValueError(f"{where}: expected {len(args)} values, got {value!r}")
    return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


def _coerce_scalar(hint, value, where):
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def non_default_fields(config: Any) -> dict:
    """``config_to_dict(config)`` without the fields (nested ones too) that equal the class default, under the
    names fields had before any rename (what fingerprints hash)."""
    try:
        defaults = config_to_dict(type(config)())
    except (TypeError, ValueError):  # a class without a valid default instance: keep every field
        defaults = {}
    return _changed(config, config_to_dict(config), defaults)


def _changed(config: Any, values: dict, defaults: dict) -> dict:
    old_names = {new: old for old, new in renamed_fields(type(config)).items()}
    out = {}
    for key, value in values.items():
        if key in defaults and value == defaults[key]:
            continue
        if key in defaults and isinstance(value, dict) and isinstance(defaults[key], dict):
            value = _changed(getattr(config, key), value, defaults[key])
        out[old_names.get(key, key)] = value
    return out


# ---- presets and resolution ---------------------------------------------------------------------
def preset_names() -> list[str]:
    """The names of the shipped presets (``--config NAME``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset(name: str) -> dict:
    """A config shipped in ``harness/presets`` (e.g. ``tokenizer-digits``)."""
    file = PRESET_DIR / f"{name}.json"
    if not file.is_file():
        raise FileNotFoundError(f"no built-in config {name!r} (built-in: {', '.join(preset_names())})")
    return json.loads(file.read_text())


def load_config_file(path: str | Path) -> dict:
    """A JSON config file, or a preset's name (``--config tokenizer-photos-256``)."""
    path = Path(path)
    if not path.is_file() and path.suffix == "" and (PRESET_DIR / f"{path}.json").is_file():
        return preset(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found (nor a built-in config of that name: "
                                f"{', '.join(preset_names())})")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {path} is not valid JSON: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a JSON object, got {type(values).__name__}")
    return values


def merge(base: dict, override: dict) -> dict:
    """Deep merge: nested dicts merge key by key, other values replace."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve(cls: type[T], base: dict, flags: dict) -> T:
    """``base`` (a preset, possibly merged with a config file) <- the flags that were given (None = not given)."""
    return config_from_dict(cls, merge(base, {k: v for k, v in flags.items() if v is not None}))
