"""benchmarks/peer_vqvae.py without the peer's checkout: the matched-FLOPs row is matched, tokgen's side
trains and round-trips under ``--mixed-precision bf16`` as it does in fp32 (codes chosen in fp32), and the precision
part trains both side by side."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import peer_vqvae
from benchmarks.peer_vqvae import PEER_TRAIN_FLOPS_PER_64PX_IMAGE, TokgenSide, matched_flops_values, quality_table, \
    train_together

PEER_TRAIN_GFLOP_PER_64PX_IMAGE = PEER_TRAIN_FLOPS_PER_64PX_IMAGE / 1e9


def test_the_matched_flops_row_spends_the_peers_flops(tmp_path):
    side = TokgenSide(matched_flops_values(), 64, 2, tmp_path)
    x = torch.rand(2, 3, 64, 64)
    with FlopCounterMode(display=False) as counter:
        side.model(x).loss.backward()
    ratio = counter.get_total_flops() / 2 / (PEER_TRAIN_GFLOP_PER_64PX_IMAGE * 1e9)
    assert 0.9 < ratio < 1.1, ratio


def test_tokgen_side_trains_and_round_trips_in_bf16(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    fp32, bf16 = TokgenSide({}, 64, 2, tmp_path / "a"), TokgenSide({}, 64, 2, tmp_path / "b", "bf16")
    bf16.model.load_state_dict(fp32.model.state_dict())
    before = [p.detach().clone() for p in bf16.parameters()]
    bf16.train_step(x)  # raises if the loss was not finite
    assert any(not torch.equal(a, p) for a, p in zip(before, bf16.parameters()))
    assert all(p.dtype == torch.float32 for p in bf16.parameters())  # autocast, not a bf16 model
    with torch.no_grad():
        codes = bf16.encode(x)
        recon = bf16.decode(codes)
    assert [c.dtype for c in codes] == [torch.int64] * 2 and [c.shape[-1] for c in codes] == [8, 16]
    assert recon.dtype == torch.float32 and recon.shape == x.shape and 0 <= recon.min() and recon.max() <= 1


def test_the_precision_part_trains_tokgen_in_fp32_and_bf16_side_by_side():
    """``--parts precision``: two worker processes at once, the same preset and seed, one per precision."""
    fp32, bf16 = train_together([("tokgen", "no"), ("tokgen", "bf16")], "unused", 0.5, 0, {})
    assert [fp32["mixed_precision"], bf16["mixed_precision"]] == ["no", "bf16"]
    for r in (fp32, bf16):
        assert r["side"] == "tokgen" and r["steps"] >= 1 and r["seed"] == 0
        assert math.isfinite(r["psnr"]) and 0 <= r["lpips"] and len(r["codes_used_top_first"]) == 2
    assert "tokgen tokenizer-image, bf16" in quality_table([[fp32, bf16]])


def test_the_gpu_speed_part_refuses_the_other_parts(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        peer_vqvae.main(["--peer", str(tmp_path), "--device", "cuda", "--parts", "speed,quality"])
    assert err.value.code == 2 and "--parts speed" in capsys.readouterr().err


FAKE_PEER = '''
import torch
from torch import nn


class VQVAE(nn.Module):
    """Stands in for the peer's model: the calls the benchmark makes, one conv each way."""

    def __init__(self):
        super().__init__()
        self.down, self.up = nn.Conv2d(3, 4, 4, stride=4), nn.ConvTranspose2d(4, 3, 4, stride=4)

    def forward(self, x):
        return self.up(self.down(x)), torch.zeros(())

    def encode(self, x):
        z = self.down(x)
        return None, None, None, z.argmax(1), z.argmin(1)

    def decode_code(self, top, bottom):
        return self.up(torch.stack([top, bottom] * 2, 1).float())
'''


def test_the_speed_part_adds_compiled_train_steps(tmp_path, monkeypatch):
    """``--dynamo-backend``: each tokgen row gets a compiled twin whose train step is timed (with its twin's FLOPs)
    after the warm-up steps that compile it; its encode and decode cells stay empty in the table."""
    (tmp_path / "vqvae.py").write_text(FAKE_PEER)
    (tmp_path / "pixelsnail.py").write_text("")
    monkeypatch.setattr(peer_vqvae, "peak_gflops", lambda: {"matmul": 1.0, "conv3x3": 1.0, "peak": 1.0})
    run = peer_vqvae.speed_worker(str(tmp_path), 32, 2, 1, dynamo_backend="aot_eager")
    shipped, compiled = "tokgen tokenizer-image (shipped)", "tokgen tokenizer-image (shipped), compiled (aot_eager)"
    assert run["flops"][f"{compiled}|train"] == run["flops"][f"{shipped}|train"] > 0
    assert f"{compiled}|encode" not in run["seconds"] and len(run["seconds"][f"{compiled}|train"]) == 1
    assert run["compile_seconds_per_warmup_step"][compiled] > 0 and run["dynamo_backend"] == "aot_eager"
    row = next(line for line in peer_vqvae.speed_table([run]).splitlines() if compiled in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6:12] == ["-"] * 6 and cells[4].endswith("x")


def test_dynamo_mode_needs_a_backend(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        peer_vqvae.main(["--peer", str(tmp_path), "--parts", "speed", "--dynamo-mode", "reduce-overhead"])
    assert err.value.code == 2 and "--dynamo-mode goes with --dynamo-backend" in capsys.readouterr().err


def test_the_ceiling_part_sets_the_fastest_conv_layer_against_one_and_a_half_peers(tmp_path, monkeypatch):
    (tmp_path / "vqvae.py").write_text(FAKE_PEER)
    (tmp_path / "pixelsnail.py").write_text("")
    monkeypatch.setattr(peer_vqvae, "peak_gflops", lambda: {"matmul": 1.0, "conv3x3": 1.0, "peak": 1.0})
    monkeypatch.setattr(peer_vqvae, "CEILING_WIDTHS", (8, 16))
    run = peer_vqvae.ceiling_worker(str(tmp_path), 32, 2, 1)
    assert {(c["width"], c["map"], c["channels_last"]) for c in run["convs"]} == {
        (w, m, cl) for w in (8, 16) for m in (8, 4) for cl in (False, True)}
    assert run["peer_train_gflops"] > 0 and all(c["gflops"] > 0 for c in run["convs"])
    best = max(c["gflops"] for c in run["convs"])
    row = next(line for line in peer_vqvae.ceiling_table([run]).splitlines() if line.startswith("| 32 px"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3].startswith(f"{best:.0f} (C ") and float(cells[4]) == pytest.approx(
        best / (1.5 * run["peer_train_gflops"]), abs=0.006)
