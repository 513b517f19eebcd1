"""How much does the sample judge move with its own seed? One pipeline's samples held fixed, many judges.

Method: a demo's pipeline draws ``--per-class`` samples of each class (seeded ``--seed``, guidance ``--guidance``,
temperature ``--temperature``, batches of 100, as ``tokgen demo`` draws them; §16h's figures were drawn at
temperature 1, the spoken-digits demo's until §16i). ``--classifiers`` classifiers of ``pipelines.judge`` (seeds 0, 1, ...,
``--steps`` steps each) are trained on the real training items of the demo's dataset, cut as the items its prior
learned. Each labels the samples and the held-out real items. An ensemble of k averages the log-probabilities of k of
them, as the judge does (``pipelines.judge.NUM_JUDGES``); the spread of k-ensembles is taken over ``--subsets``
random k-subsets of the classifiers (they overlap, so the spread at larger k is if anything too low).

``python -m benchmarks.judge_spread DEMO_DIR/pipeline --dataset spoken-digits --guidance 1.5 --seed 1``
(BENCHMARKS.md §16h)
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import machine_info, table, write_result
from harness.config import config_from_dict, preset
from pipelines.demo import DEMOS, items_config
from pipelines.judge import Judge, train_judge
from pipelines.pipeline import TokgenPipeline
from pipelines.sample import generate
from stage1_tokenizer.train import TokenizerTrainConfig, build_dataset
from stage2_prior.sampling import SamplingOptions


def ensemble_spread(samples_log_probs: torch.Tensor, labels: torch.Tensor, real_log_probs: torch.Tensor,
                    real_labels: torch.Tensor, k: int, subsets: int, seed: int = 0) -> dict:
    """samples_log_probs (J, N, K) and real_log_probs (J, M, K) of J classifiers -> the share labelled right by the
    mean of k of them, over ``subsets`` random k-subsets: mean, sd, min, max (samples) and mean, sd (real items)."""
    rng = random.Random(seed)
    hits, real = [], []
    for _ in range(subsets):
        idx = rng.sample(range(len(samples_log_probs)), k)
        hits.append(float((samples_log_probs[idx].mean(0).argmax(-1) == labels).float().mean()))
        real.append(float((real_log_probs[idx].mean(0).argmax(-1) == real_labels).float().mean()))
    hits_t, real_t = torch.tensor(hits), torch.tensor(real)
    return {"k": k, "samples_mean": float(hits_t.mean()), "samples_sd": float(hits_t.std()),
            "samples_min": float(hits_t.min()), "samples_max": float(hits_t.max()),
            "real_mean": float(real_t.mean()), "real_sd": float(real_t.std())}


def classifier_log_probs(judge: Judge, x: torch.Tensor) -> torch.Tensor:
    """(J, N, K): each of the judge's classifiers alone on x (N, C, *S)."""
    return torch.stack([replace(judge, models=[m]).log_probs(x) for m in judge.models])


def run(pipeline: Path, dataset: str, guidance: float, seed: int, per_class: int, classifiers: int, steps: int,
        subsets: int, ks: list[int], temperature: float = 1.0) -> dict:
    spec = DEMOS[dataset]
    cfg = items_config(config_from_dict(TokenizerTrainConfig, preset(spec.tokenizer)), spec)
    pipe = TokgenPipeline.from_pretrained(pipeline)
    labels = torch.arange(pipe.num_classes).repeat_interleave(per_class)
    options = SamplingOptions(temperature=temperature, guidance=guidance)
    samples, _, _ = generate(pipe, len(labels), labels, seed, 100, options, quiet=True)
    m = cfg.model_config
    judge = train_judge(build_dataset(cfg, "train"), m.modality, pipe.num_classes, m.sample_rate or 16000, steps,
                        num_judges=classifiers)
    held_out = build_dataset(cfg, "eval")
    items = [held_out[i] for i in range(len(held_out))]
    x_real, y_real = torch.stack([it["x"] for it in items]), torch.tensor([int(it["label"]) for it in items])
    on_samples, on_real = classifier_log_probs(judge, samples), classifier_log_probs(judge, x_real)
    single = [{"classifier_seed": i, "samples": float((s.argmax(-1) == labels).float().mean()),
               "real": float((r.argmax(-1) == y_real).float().mean())}
              for i, (s, r) in enumerate(zip(on_samples, on_real))]
    return {"single": single,
            "ensembles": [ensemble_spread(on_samples, labels, on_real, y_real, k, subsets)
                          for k in ks if k <= classifiers]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.judge_spread")
    p.add_argument("pipeline", type=Path, help="a demo's pipeline folder")
    p.add_argument("--dataset", default="spoken-digits", choices=sorted(DEMOS), help="the demo it came from")
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--temperature", type=float, default=1.0, help="(the spoken-digits demo now draws at 0.9)")
    p.add_argument("--seed", type=int, default=1, help="seeds the draws")
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--classifiers", type=int, default=15)
    p.add_argument("--steps", type=int, default=600, help="training steps of each classifier")
    p.add_argument("--subsets", type=int, default=300)
    p.add_argument("--k", default="1,3,5,7", help="ensemble sizes, comma-separated")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = run(args.pipeline, args.dataset, args.guidance, args.seed, args.per_class, args.classifiers, args.steps,
                 args.subsets, [int(k) for k in args.k.split(",")], args.temperature)
    columns = ["k classifiers", "samples: mean", "sd", "min", "max", "real: mean", "sd"]
    print(table(columns,
                [[e["k"], e["samples_mean"], e["samples_sd"], e["samples_min"], e["samples_max"], e["real_mean"],
                  e["real_sd"]] for e in result["ensembles"]]))
    write_result("judge_spread", result, machine_info(),
                 "python -m benchmarks.judge_spread " + " ".join(sys.argv[1:] if argv is None else argv),
                 time.perf_counter() - started)


if __name__ == "__main__":
    main()
