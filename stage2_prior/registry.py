"""Prior architectures by name, and the run info that ties a trained prior to its tokens.

The arch name a training config gives (``"transformer"``, ``"pixelcnn"``, ``"wavenet"``) is the
``model_type`` a saved folder's config.json records.
"""
from __future__ import annotations

import json
from pathlib import Path

from harness.folders import read_config, write_json
from stage2_prior.base import PriorConfig, PriorMixin
from stage2_prior.pixelcnn import GatedPixelCNNPrior
from stage2_prior.transformer import TransformerPrior
from stage2_prior.wavenet import WaveNetPrior

ARCHS: dict[str, type[PriorMixin]] = {cls.model_type: cls for cls in (TransformerPrior, GatedPixelCNNPrior, WaveNetPrior)}
RUN_INFO = "prior.json"  # beside a prior run's model/: which tokens, tokenizer and level the prior belongs to


def prior_classes(arch: str) -> tuple[type[PriorMixin], type[PriorConfig]]:
    """(model class, config class) of the prior architecture ``arch``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown prior architecture {arch!r}; choose one of {sorted(ARCHS)}")
    return ARCHS[arch], ARCHS[arch].config_class


def load_prior(path, map_location: str = "cpu"):
    """Any saved prior folder, whatever its architecture."""
    model_type = read_config(path).get("model_type")
    for cls in ARCHS.values():
        if cls.holds(model_type):
            return cls.from_pretrained(path, map_location)
    raise ValueError(f"{path} holds a {model_type!r} model, which is not a prior")


def write_prior_run(run_dir: Path, info: dict) -> None:
    write_json(Path(run_dir) / RUN_INFO, info)


def read_prior_run(path: str | Path) -> tuple[Path, dict | None]:
    """(the prior's model folder, its run info or None) for a prior run folder or a bare model folder."""
    path = Path(path)
    folder = path / "model" if (path / "model").is_dir() else path
    info_file = folder.parent / RUN_INFO
    if not info_file.is_file():
        return folder, None
    try:
        return folder, json.loads(info_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{info_file} is not valid JSON: {err}") from err
