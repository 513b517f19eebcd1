"""benchmarks/quantizers.py: every variant codes the testbed's bits a position, and differs from the testbed's preset
in its quantizer alone."""
from __future__ import annotations

import math

import pytest

from benchmarks.quantizers import TESTBEDS, describe, fsq_levels, variant_config, variants
from harness.config import config_from_dict, preset
from stage1_tokenizer.quantizer import QuantizerConfig
from stage1_tokenizer.train import TokenizerTrainConfig


@pytest.mark.parametrize("bits", [8, 12])
def test_every_variant_codes_the_same_bits_a_position(bits):
    found = variants(bits)
    assert {"vq", "fsq", "lfq", "rvq2"} <= set(found)
    for name, fields in found.items():
        q = QuantizerConfig(**fields)
        stages = q.num_stages if q.kind == "rvq" else 1
        assert math.isclose(stages * math.log2(q.codebook_size), bits), (name, describe(fields))
    assert math.prod(fsq_levels(bits)) == 2 ** bits


@pytest.mark.parametrize("bed_name", sorted(TESTBEDS))
def test_a_variant_changes_only_the_quantizer(bed_name):
    bed = TESTBEDS[bed_name]
    base = preset(bed.tokenizer)
    for name, fields in variants(bed.bits).items():
        values = variant_config(bed, fields, tokenizer_steps=None, seed=0)
        cfg = config_from_dict(TokenizerTrainConfig, values)  # resolves: the variant is a valid config
        assert cfg.max_steps == base["max_steps"]
        assert {k: v for k, v in values.items() if k not in ("model", "seed", "image_every")} == \
               {k: v for k, v in base.items() if k not in ("model", "seed", "image_every")}
        assert {k: v for k, v in values["model"].items() if k != "quantizer"} == \
               {k: v for k, v in base["model"].items() if k not in ("quantizer", "codebook_sizes")}
        assert cfg.model_config.quantizer.kind == fields["kind"], name
    fewer = config_from_dict(TokenizerTrainConfig, variant_config(bed, {"kind": "vq"}, tokenizer_steps=30, seed=1))
    assert fewer.max_steps == fewer.checkpoint_every == 30 and fewer.seed == 1
