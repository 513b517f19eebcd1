"""harness.config: JSON values become config dataclasses with their types checked, renamed fields load under
their old names (and keep fingerprints), presets resolve by name or file."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from harness.config import (config_from_dict, config_to_dict, load_config_file, merge, non_default_fields, preset,
                            preset_names, resolve)


@dataclass
class Inner:
    renamed_fields: ClassVar[dict[str, str]] = {"beta": "weight"}

    weight: float = 0.25
    size: int = 4


@dataclass
class Outer:
    name: str = "x"
    flag: bool = False
    steps: int = 10
    rate: float = 1e-3
    shape: tuple[int, ...] = (8, 8)
    pair: tuple[float, float] = (0.9, 0.99)
    maybe: int | None = None
    inner: Inner = field(default_factory=Inner)
    options: dict = field(default_factory=dict)


def test_round_trip_and_coercion():
    cfg = Outer(name="y", flag=True, steps=3, rate=2, shape=(4, 5, 6), maybe=7, inner=Inner(0.5, 2), options={"a": 1})
    again = config_from_dict(Outer, json.loads(json.dumps(config_to_dict(cfg))))
    assert again == cfg and isinstance(again.shape, tuple) and isinstance(again.inner, Inner)
    assert config_from_dict(Outer, {"rate": 3, "steps": 1000.0}).rate == 3.0  # an int is a float; 1000.0 an int
    assert config_from_dict(Outer, {"maybe": None}).maybe is None


@pytest.mark.parametrize("values, field_name", [
    ({"flag": "false"}, "Outer.flag"),          # a string that would be truthy
    ({"flag": 1}, "Outer.flag"),
    ({"rate": "1e-3"}, "Outer.rate"),
    ({"steps": 2.5}, "Outer.steps"),
    ({"steps": True}, "Outer.steps"),
    ({"name": 3}, "Outer.name"),
    ({"shape": [8, "8"]}, r"Outer.shape\[1\]"),
    ({"shape": 8}, "Outer.shape"),
    ({"pair": [0.9]}, "Outer.pair"),
    ({"maybe": "7"}, "Outer.maybe"),
    ({"inner": {"size": "big"}}, "Inner.size"),
    ({"inner": 3}, "Outer.inner"),
    ({"options": [1]}, "Outer.options"),
])
def test_wrong_types_name_the_field(values, field_name):
    with pytest.raises(ValueError, match=field_name):
        config_from_dict(Outer, values)


def test_unknown_fields_are_errors():
    with pytest.raises(ValueError, match=r"unknown Outer fields: \['nmae'\]"):
        config_from_dict(Outer, {"nmae": "y"})
    with pytest.raises(ValueError, match="unknown Inner fields"):
        config_from_dict(Outer, {"inner": {"wieght": 1.0}})


def test_renamed_fields_load_under_old_names_and_fingerprint_under_them():
    assert config_from_dict(Inner, {"beta": 0.3}).weight == 0.3
    with pytest.raises(ValueError, match="not both"):
        config_from_dict(Inner, {"beta": 0.3, "weight": 0.3})
    # what fingerprints hash: non-default fields only, under the names they had when the model was saved
    assert non_default_fields(Outer(inner=Inner(weight=0.3))) == {"inner": {"beta": 0.3}}
    assert non_default_fields(Outer()) == {}


def test_presets_and_resolution(tmp_path):
    assert "tokenizer-digits" in preset_names() and "prior-digits" in preset_names()
    assert load_config_file("tokenizer-digits") == preset("tokenizer-digits")  # --config takes a preset's name
    with pytest.raises(FileNotFoundError, match="built-in"):
        preset("no-such-preset")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config_file(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_config_file(tmp_path / "list.json")
    assert merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 5}}) == {"a": {"b": 5, "c": 2}, "d": 3}
    cfg = resolve(Outer, {"steps": 5, "inner": {"size": 2}}, {"steps": None, "rate": 0.5})
    assert cfg.steps == 5 and cfg.rate == 0.5 and cfg.inner.size == 2  # None means "flag not given"
