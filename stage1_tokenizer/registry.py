"""Tokenizer architectures by name: a training config names one, a saved folder's config.json says which."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from data.modalities import DEFAULT_EVAL_FRACTION, held_out_source
from harness.folders import CONFIG_NAME, read_config
from stage1_tokenizer.base import Tokenizer, TokenizerConfig
from stage1_tokenizer.hvqvae import HierarchicalVQVAE, HierarchicalVQVAEConfig
from stage1_tokenizer.vqvae import VQVAE, VQVAEConfig

# arch name (= the model_type in config.json) -> (model class, config class)
TOKENIZERS: dict[str, tuple[type[Tokenizer], type[TokenizerConfig]]] = {
    "vqvae": (VQVAE, VQVAEConfig),
    "hvqvae": (HierarchicalVQVAE, HierarchicalVQVAEConfig),
}


def tokenizer_classes(arch: str) -> tuple[type[Tokenizer], type[TokenizerConfig]]:
    if arch not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer arch {arch!r}; choose one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[arch]


def tokenizer_folder(path: str | Path) -> Path:
    """The model folder of a tokenizer given as a model folder, a run folder (its ``model/``) or a pipeline
    folder (its ``tokenizer/``)."""
    path = Path(path)
    for candidate in (path, path / "model", path / "tokenizer"):
        if (candidate / CONFIG_NAME).is_file() and read_config(candidate).get("model_type") in TOKENIZERS:
            return candidate
    raise FileNotFoundError(f"no tokenizer found at {path} (looked for config.json in it, model/ and tokenizer/)")


def load_tokenizer(path: str | Path, map_location: str = "cpu") -> Tokenizer:
    """A tokenizer from a model folder, a run folder or a pipeline folder."""
    folder = tokenizer_folder(path)
    model_cls, _ = TOKENIZERS[read_config(folder)["model_type"]]
    return model_cls.from_pretrained(folder, map_location)


@dataclass
class TrainingData:
    """What a tokenizer was trained on, from its run's config.json: what evaluation and export feed it unless told
    otherwise."""

    source: str | None = None
    options: dict = field(default_factory=dict)  # build_dataset size options and the reader's data_options
    eval_fraction: float = DEFAULT_EVAL_FRACTION
    eval_data: str | None = None

    def held_out(self, source: str, split: str, eval_fraction: float | None = None,
                 eval_data: str | None = None) -> tuple[str, dict]:
        """(source, build_dataset options) for ``split`` of ``source``: the run's held-out split when ``source`` is
        what it trained on (the given ``eval_fraction`` / ``eval_data`` override it)."""
        same = source == self.source
        fraction = eval_fraction if eval_fraction is not None else (self.eval_fraction if same else
                                                                   DEFAULT_EVAL_FRACTION)
        held = eval_data if eval_data is not None else (self.eval_data if same else None)
        chosen, fraction = held_out_source(source, split, fraction, held)
        options = dict(self.options) if chosen == self.source else {
            k: v for k, v in self.options.items() if k in ("size", "frames")}
        return chosen, {**options, "eval_fraction": fraction}


def add_held_out_arguments(p) -> None:
    """--eval-fraction and --eval-data for the commands that read a tokenizer's held-out split."""
    p.add_argument("--eval-fraction", type=float,
                   help="share of a folder's files (a shard set's samples) held out, by a stable hash of the path "
                        f"(default: the tokenizer run's for its own --data, else {DEFAULT_EVAL_FRACTION}; 0 = none)")
    p.add_argument("--eval-data", help="a separate held-out source (default: the tokenizer run's for its own --data)")


def held_out_report(source: str, options: dict, dataset) -> dict:
    """What evaluation and export record about the held-out split they read: source, fraction, files."""
    report = {"source": source, "eval_fraction": options.get("eval_fraction", 0.0)}
    if isinstance(getattr(dataset, "files", None), list):
        report["files"] = list(dataset.files)
    return report


def training_data(path: str | Path, size: int | None = None) -> TrainingData:
    """The training data of the tokenizer at ``path`` (a model folder beside its run's config.json, or the run);
    ``size`` overrides the input size it was trained at (32 when there is no run config)."""
    for candidate in (Path(path) / "config.json", Path(path).parent / "config.json"):
        if candidate.is_file():
            cfg = json.loads(candidate.read_text())
            if isinstance(cfg.get("size"), int):
                options = {"size": size or cfg["size"], **(cfg.get("data_options") or {})}
                if cfg.get("model", {}).get("modality") == "video":
                    options["frames"] = cfg.get("frames", 16)
                return TrainingData(cfg.get("data"), options, cfg.get("eval_fraction", DEFAULT_EVAL_FRACTION),
                                    cfg.get("eval_data"))
    return TrainingData(options={"size": size or 32})
