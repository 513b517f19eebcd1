"""benchmarks/adversarial.py: the pair it trains differs in the discriminator's weight alone, and the "better"
verdict follows each metric's direction."""
from __future__ import annotations

from dataclasses import replace

from benchmarks.adversarial import PARTS, configs, wins
from harness.config import preset


def test_the_pair_differs_only_in_the_adversarial_weight():
    for name, part in PARTS.items():
        pair = configs(part, None, seed=3)
        assert pair["with"].adversarial.weight > 0 and pair["without"].adversarial.weight == 0, name
        same = replace(pair["without"], adversarial=replace(pair["without"].adversarial,
                                                            weight=pair["with"].adversarial.weight))
        assert same == pair["with"], name
        assert pair["with"].seed == 3 and pair["with"].max_steps == preset(part.preset)["max_steps"]


def test_fewer_steps_start_the_discriminator_by_halfway():
    pair = configs(PARTS["photos"], 40, seed=0)
    assert pair["with"].max_steps == 40 and pair["with"].adversarial.disc_start == 20
    assert pair["with"].adversarial.ramp_steps <= 10


def test_wins_follow_each_metrics_direction():
    result = {"without": {"metrics": {"psnr_db": 27.0, "lpips": 0.14, "fd_vgg16": 70.0}},
              "with": {"metrics": {"psnr_db": 26.5, "lpips": 0.12, "fd_vgg16": 75.0}}}
    assert wins("photos", result) == {"psnr_db": False, "lpips": True, "fd_vgg16": False}
