"""Tokenizer architectures by name: a training config names one, a saved folder's config.json says which."""
from __future__ import annotations

import json
from pathlib import Path

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


def training_data(path: str | Path, size: int | None = None, source: str | None = None) -> dict:
    """``build_dataset`` size options the tokenizer at ``path`` was trained at, from its run's config.json:
    what evaluation and export feed it unless told otherwise (``size`` overrides). The run's ``data_options``
    come too when ``source`` is the source it was trained on (they are that reader's options)."""
    for candidate in (Path(path) / "config.json", Path(path).parent / "config.json"):
        if candidate.is_file():
            cfg = json.loads(candidate.read_text())
            if isinstance(cfg.get("size"), int):
                out = {"size": size or cfg["size"]}
                if cfg.get("model", {}).get("modality") == "video":
                    out["frames"] = cfg.get("frames", 16)
                if source is not None and source == cfg.get("data"):
                    out.update(cfg.get("data_options") or {})
                return out
    return {"size": size or 32}
