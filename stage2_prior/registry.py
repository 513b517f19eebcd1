"""Prior architectures by name: the training config names one, a saved folder's config.json says which."""
from __future__ import annotations

import importlib
import importlib.util

# arch name -> (module, model class, config class)
ARCHS = {
    "transformer": ("stage2_prior.transformer", "TransformerPrior", "TransformerPriorConfig"),
    "pixelcnn": ("stage2_prior.pixelcnn", "GatedPixelCNNPrior", "GatedPixelCNNConfig"),
    "wavenet": ("stage2_prior.wavenet", "WaveNetPrior", "WaveNetConfig"),
}


def prior_classes(arch: str):
    if arch not in ARCHS:
        raise ValueError(f"unknown prior architecture {arch!r}; choose one of {sorted(ARCHS)}")
    module, model, config = ARCHS[arch]
    mod = importlib.import_module(module)
    return getattr(mod, model), getattr(mod, config)


def load_prior(path):
    """Any saved prior folder, whatever its architecture."""
    from pipelines.hub import read_config

    model_type = read_config(path).get("model_type")
    for arch in ARCHS:
        cls, _ = prior_classes(arch) if _importable(arch) else (None, None)
        if cls is not None and cls.model_type == model_type:
            return cls.from_pretrained(path)
    raise ValueError(f"{path} holds a {model_type!r} model, which is not a prior")


def _importable(arch: str) -> bool:
    return importlib.util.find_spec(ARCHS[arch][0]) is not None
