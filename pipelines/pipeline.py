"""The generation pipeline: a tokenizer and its priors (one per level, top first), saved as one folder.

``pipe(batch_size=..., class_labels=...)`` samples codes ancestrally (the top level from its prior,
then each lower level from its prior conditioned on the level above) and decodes them.
``likelihood(x)`` gives exact bits per dimension; ``complete(x, known_fraction)`` keeps the codes of
the known part (top rows, first frames, start of a clip) and samples the rest.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.hub import atomic_write_dir
from stage2_prior.registry import load_prior
from stage2_prior.sampling import sample

FORMAT = "tokgen-pipeline"
VERSION = 1


@dataclass
class PipelineOutput:
    """samples: decoded (B, C, *S) in the data range, or None when only codes were asked for;
    codes: one LongTensor (B, *grid) per level, top first."""

    samples: torch.Tensor | None
    codes: list[torch.Tensor]


class TokgenPipeline:
    def __init__(self, tokenizer, priors: list, input_shape: tuple[int, ...], class_names: list[str] | None = None):
        if len(priors) != tokenizer.num_levels:
            raise ValueError(f"the tokenizer has {tokenizer.num_levels} level(s) but {len(priors)} prior(s) were given")
        self.tokenizer, self.priors = tokenizer.eval(), [p.eval() for p in priors]
        self.input_shape = tuple(input_shape)
        self.class_names = class_names
        self._check_shapes()

    def _check_shapes(self) -> None:
        shapes = self.tokenizer.code_shapes(self.input_shape)
        for level, (prior, shape, k) in enumerate(zip(self.priors, shapes, self.tokenizer.codebook_sizes)):
            if tuple(prior.config.grid_shape) != tuple(shape) or prior.config.vocab_size != k:
                raise ValueError(
                    f"level-{level} prior models {tuple(prior.config.grid_shape)} grids of {prior.config.vocab_size} "
                    f"codes, but the tokenizer makes {tuple(shape)} grids of {k} codes: they do not belong together"
                )

    def with_input_shape(self, input_shape: tuple[int, ...]) -> "TokgenPipeline":
        """This pipeline for inputs of another size (C, *S): the tokenizer is fully convolutional, and
        convolutional priors take any grid; a transformer prior refuses (its positions are learned)."""
        input_shape = tuple(input_shape)
        if input_shape == self.input_shape:
            return self
        shapes = self.tokenizer.code_shapes(input_shape)
        priors = [p.with_grid(shape, shapes[level - 1] if level > 0 else None)
                  for level, (p, shape) in enumerate(zip(self.priors, shapes))]
        return TokgenPipeline(self.tokenizer, priors, input_shape, self.class_names)

    @property
    def modality(self) -> str:
        return self.tokenizer.config.modality

    @property
    def num_classes(self) -> int:
        return self.priors[0].config.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.tokenizer.parameters()).device

    def to(self, device) -> "TokgenPipeline":
        self.tokenizer.to(device)
        for p in self.priors:
            p.to(device)
        return self

    def fingerprint(self) -> str:
        """Hex SHA-256 naming this exact tokenizer + priors combination."""
        h = hashlib.sha256(self.tokenizer.fingerprint().encode())
        for p in self.priors:
            h.update(p.fingerprint().encode())
        return h.hexdigest()

    # ---- saving -------------------------------------------------------------------------------
    @classmethod
    def from_runs(cls, tokenizer_path, prior_paths: list, class_names: list[str] | None = None) -> "TokgenPipeline":
        """Assemble from training runs, checking every prior was trained on this tokenizer's tokens."""
        from stage1_tokenizer.evaluate import load_tokenizer
        from stage2_prior.train import INFO_NAME

        tokenizer = load_tokenizer(tokenizer_path)
        fp, priors, input_shape = tokenizer.fingerprint(), [], None
        for path in map(Path, prior_paths):
            folder = path / "model" if (path / "model").is_dir() else path
            info_file = folder.parent / INFO_NAME
            if info_file.is_file():
                info = json.loads(info_file.read_text())
                if info["tokenizer_fingerprint"] != fp:
                    raise ValueError(f"the prior in {path} was trained on tokens of another tokenizer "
                                     f"({info['tokenizer_fingerprint'][:12]}, not {fp[:12]})")
                input_shape = tuple(info["input_shape"])
            priors.append(load_prior(folder))
        if input_shape is None:
            raise ValueError("cannot tell the input shape: pass prior run folders (with prior.json)")
        return cls(tokenizer, priors, input_shape, class_names)

    def save_pretrained(self, path) -> None:
        def write(tmp: Path) -> None:
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            for level, prior in enumerate(self.priors):
                prior.save_pretrained(tmp / f"prior_{level}")
            meta = {"format": FORMAT, "version": VERSION, "modality": self.modality,
                    "input_shape": list(self.input_shape), "class_names": self.class_names,
                    "priors": [f"prior_{level}" for level in range(len(self.priors))],
                    "tokenizer_fingerprint": self.tokenizer.fingerprint(), "fingerprint": self.fingerprint()}
            (tmp / "pipeline.json").write_text(json.dumps(meta, indent=2) + "\n")

        atomic_write_dir(Path(path), write)

    @classmethod
    def from_pretrained(cls, path, map_location="cpu") -> "TokgenPipeline":
        from stage1_tokenizer.evaluate import load_tokenizer

        path = Path(path)
        meta_file = path / "pipeline.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found: {path} is not a saved tokgen pipeline")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
            raise ValueError(f"{meta_file} is not a tokgen pipeline this version can read")
        pipe = cls(load_tokenizer(path / "tokenizer"), [load_prior(path / p) for p in meta["priors"]],
                   tuple(meta["input_shape"]), meta.get("class_names"))
        if meta.get("fingerprint") and pipe.fingerprint() != meta["fingerprint"]:
            raise ValueError(f"{path}: the weights do not match the fingerprint in pipeline.json (modified files?)")
        return pipe.to(map_location)

    # ---- generation ---------------------------------------------------------------------------
    def _labels(self, batch_size: int, class_labels) -> torch.Tensor | None:
        if self.num_classes == 0:
            if class_labels is not None:
                raise ValueError("this pipeline's prior is unconditional: do not pass class_labels")
            return None
        if class_labels is None:
            raise ValueError(f"this pipeline is class-conditional ({self.num_classes} classes): pass class_labels")
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"got {labels.numel()} class labels for a batch of {batch_size}")
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(f"class labels must lie in [0, {self.num_classes}), got {labels.tolist()}")
        return labels.to(self.device)

    @torch.no_grad()
    def sample_codes(self, batch_size: int = 1, class_labels=None, temperature: float = 1.0, top_k=None,
                     top_p=None, generator: torch.Generator | None = None, use_cache: bool = True,
                     prefixes: list[torch.Tensor | None] | None = None, progress=None,
                     guidance: float = 1.0) -> list[torch.Tensor]:
        """Codes for every level, top first, each level conditioned on the one above.

        guidance: classifier-free guidance scale for the class-conditional levels (1.0 = none; > 1 needs
        priors trained with class dropout).
        """
        labels = self._labels(batch_size, class_labels)
        if guidance != 1.0 and labels is None:
            raise ValueError(f"guidance {guidance} is for class-conditional pipelines; this one is unconditional")
        codes: list[torch.Tensor] = []
        for level, prior in enumerate(self.priors):
            cond = codes[-1] if level > 0 else None
            prefix = prefixes[level] if prefixes is not None else None
            conditional = bool(prior.config.num_classes)
            codes.append(sample(prior, batch_size, labels if conditional else None, cond, temperature, top_k,
                                top_p, generator, use_cache, prefix, progress, guidance if conditional else 1.0))
        return codes

    @torch.no_grad()
    def decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        x = self.tokenizer.decode_levels([c.to(self.device) for c in codes])
        return x.clamp(-1, 1) if self.modality == "audio" else x.clamp(0, 1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.tokenizer.encode_levels(x.to(self.device))

    def __call__(self, batch_size: int = 1, class_labels=None, temperature: float = 1.0, top_k=None, top_p=None,
                 generator: torch.Generator | None = None, use_cache: bool = True, output_type: str = "decoded",
                 progress=None, guidance: float = 1.0) -> PipelineOutput:
        if output_type not in ("decoded", "codes"):
            raise ValueError(f"output_type must be 'decoded' or 'codes', got {output_type!r}")
        codes = self.sample_codes(batch_size, class_labels, temperature, top_k, top_p, generator, use_cache,
                                  progress=progress, guidance=guidance)
        return PipelineOutput(self.decode(codes) if output_type == "decoded" else None, codes)

    @torch.no_grad()
    def sample_long(self, length: int, batch_size: int = 1, class_labels=None, temperature: float = 1.0,
                    top_k=None, top_p=None, generator=None, overlap: float = 0.5, progress=None,
                    guidance: float = 1.0) -> PipelineOutput:
        """Samples longer than the training inputs along the first axis (video frames, audio samples).

        Convolutional priors take the longer grid directly; a transformer, whose positions are learned
        for the training length, slides a window over time: each new window keeps the last ``overlap``
        of the previous one as its prefix and samples the rest (VideoGPT-style).
        """
        shape = (self.input_shape[0], length, *self.input_shape[2:])
        if all(p.shape_agnostic for p in self.priors):
            return self.with_input_shape(shape)(batch_size, class_labels, temperature, top_k, top_p, generator,
                                                progress=progress, guidance=guidance)
        if len(self.priors) != 1:
            raise ValueError("sliding-window sampling needs a single-level pipeline (or convolutional priors)")
        total = self.tokenizer.code_shapes(shape)[0][0]
        prior, labels = self.priors[0], self._labels(batch_size, class_labels)
        window = prior.config.grid_shape[0]
        keep = int(window * overlap)
        if not 0 < keep < window:
            raise ValueError(f"overlap {overlap} leaves no context or no new steps in a window of {window}")
        codes = sample(prior, batch_size, labels, None, temperature, top_k, top_p, generator, progress=progress,
                       guidance=guidance)
        while codes.shape[1] < total:
            prefix = codes[:, -keep:].flatten(1)
            new = sample(prior, batch_size, labels, None, temperature, top_k, top_p, generator, prefix=prefix,
                         progress=progress, guidance=guidance)
            codes = torch.cat([codes, new[:, keep:]], dim=1)
        codes = [codes[:, :total]]
        return PipelineOutput(self.decode(codes), codes)

    @torch.no_grad()
    def likelihood(self, x: torch.Tensor, class_labels=None) -> torch.Tensor:
        """Exact -log2 p(codes of x) per dimension of x, (B,): the lossless code length of the tokens."""
        codes = self.encode(x)
        labels = self._labels(x.shape[0], class_labels)
        bits = torch.zeros(x.shape[0], device=self.device)
        for level, (prior, c) in enumerate(zip(self.priors, codes)):
            cond = codes[level - 1] if level > 0 else None
            bits += prior.nll(c, labels if prior.config.num_classes else None, cond) / math.log(2)
        return bits / math.prod(x.shape[1:])

    def complete(self, x: torch.Tensor, known_fraction: float = 0.5, class_labels=None, temperature: float = 1.0,
                 top_k=None, top_p=None, generator=None, guidance: float = 1.0) -> PipelineOutput:
        """Keep the first ``known_fraction`` of x along its first axis (image rows, video frames, audio
        time), sample the rest of every level's codes, and decode."""
        if not 0 <= known_fraction <= 1:
            raise ValueError(f"known_fraction must lie in [0, 1], got {known_fraction}")
        codes = self.encode(x)
        prefixes = []
        for c in codes:
            rows = int(c.shape[1] * known_fraction)
            prefixes.append(c.flatten(1)[:, : rows * math.prod(c.shape[2:])])
        out = self.sample_codes(x.shape[0], class_labels, temperature, top_k, top_p, generator, True, prefixes,
                                guidance=guidance)
        return PipelineOutput(self.decode(out), out)
