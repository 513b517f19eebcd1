"""Folders saved by tokgen 0.1.0 (tests/fixtures/release-0.1.0, written before the package re-layout) still load
with no flags and give the outputs that release computed: codes, reconstructions, bits per dimension and seeded
samples, for a 2-level image pipeline (PixelCNN top prior, transformer bottom prior) and an audio WaveNet one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines import TokgenPipeline
from stage1_tokenizer import HierarchicalVQVAE, load_tokenizer
from stage2_prior import GatedPixelCNNPrior, TransformerPrior, WaveNetPrior, load_prior

RELEASE = Path(__file__).resolve().parents[1] / "fixtures" / "release-0.1.0"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(RELEASE / "expected.safetensors"))


def test_folders_load_into_todays_classes():
    tokenizer = load_tokenizer(RELEASE / "image_pipeline")
    assert isinstance(tokenizer, HierarchicalVQVAE)
    assert tokenizer.config.quantizer.commitment_weight == 0.3  # saved under its old name, beta
    top, bottom = (load_prior(RELEASE / "image_pipeline" / f"prior_{k}") for k in (0, 1))
    assert isinstance(top, GatedPixelCNNPrior) and isinstance(bottom, TransformerPrior)
    assert isinstance(load_prior(RELEASE / "audio_pipeline" / "prior_0"), WaveNetPrior)
    # the old model_type names are what the folders say
    saved = json.loads((RELEASE / "image_pipeline" / "prior_0" / "config.json").read_text())
    assert saved["model_type"] == "pixelcnn_prior" and "beta" in json.loads(
        (RELEASE / "image_pipeline" / "tokenizer" / "config.json").read_text())["quantizer"]


@pytest.mark.parametrize("name", ["image", "audio"])
def test_pipelines_keep_their_fingerprints_and_outputs(name, expected, tmp_path):
    # from_pretrained checks every weight against the fingerprint pipeline.json recorded in 0.1.0
    pipe = TokgenPipeline.from_pretrained(RELEASE / f"{name}_pipeline")
    x = expected[f"{name}_x"]
    labels = expected["image_labels"] if name == "image" else None
    with torch.no_grad():
        codes = pipe.encode(x)
        levels = len(pipe.priors)
        for level in range(levels):
            assert torch.equal(codes[level], expected[f"{name}_codes_{level}"]), level
        assert torch.allclose(pipe.decode(codes), expected[f"{name}_recon"], atol=1e-5)
        assert torch.allclose(pipe.bits_per_dim(x, class_labels=labels), expected[f"{name}_bits_per_dim"], rtol=1e-5)
    if name == "image":
        sampled = pipe(batch_size=2, class_labels=labels, guidance=2.0, top_k=8,
                       generator=torch.Generator().manual_seed(3), output_type="codes").codes
    else:
        sampled = pipe(batch_size=2, temperature=0.9, generator=torch.Generator().manual_seed(4),
                       output_type="codes").codes
    for level in range(levels):
        assert torch.equal(sampled[level], expected[f"{name}_sample_codes_{level}"]), level
    # saved again by today's code, the pipeline keeps its name
    pipe.save_pretrained(tmp_path / "again")
    assert TokgenPipeline.from_pretrained(tmp_path / "again").fingerprint() == pipe.fingerprint()
    assert json.loads((tmp_path / "again" / "pipeline.json").read_text())["fingerprint"] == json.loads(
        (RELEASE / f"{name}_pipeline" / "pipeline.json").read_text())["fingerprint"]
