"""The ground floor: what every model and training script stands on, knowing no model.

- :mod:`harness.config`: config dataclasses <-> JSON with type checks, presets (``harness/presets``),
  preset <- file <- flag resolution;
- :mod:`harness.folders`: model folders (``config.json`` + ``model.safetensors``), fingerprints, atomic writes;
- :mod:`harness.loop`, :mod:`harness.checkpoints`, :mod:`harness.data_order`: the Accelerate training loop,
  atomic checksummed checkpoints and a data order that makes resume exact;
- :mod:`harness.schedule`: the warm-up + cosine learning-rate schedule.
"""
from harness.config import config_from_dict, config_to_dict, load_config_file, merge, preset, preset_names, resolve
from harness.folders import PretrainedMixin, atomic_write_dir, read_config, write_json
from harness.schedule import warmup_cosine

__all__ = ["PretrainedMixin", "atomic_write_dir", "config_from_dict", "config_to_dict", "load_config_file", "merge",
           "preset", "preset_names", "read_config", "resolve", "warmup_cosine", "write_json"]
