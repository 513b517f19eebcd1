"""The generation pipeline: a tokenizer and its priors (one per level, top first), saved as one folder.

``pipe(batch_size=..., class_labels=...)`` samples codes ancestrally (the top level from its prior,
then each lower level from its prior conditioned on the level above) and decodes them.
``bits_per_dim(x)`` gives the exact code length of x's tokens; ``complete(x, known_fraction)`` keeps the
codes of the known part (top rows, first frames, start of a clip) and samples the rest.

A residual quantizer's code stacks, (B, *grid, depth) per level, go through every method as grids do: its
priors model every stage (``stage2_prior.stacks``), and likelihoods and token counts include them all.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.devices import autocast, resolve_device, resolve_dtype
from harness.folders import atomic_write_dir
from stage1_tokenizer.base import Tokenizer
from stage1_tokenizer.registry import load_tokenizer
from stage2_prior.base import Prior, check_class_labels, walk_levels
from stage2_prior.registry import load_prior, read_prior_run
from stage2_prior.sampling import SamplingOptions, sample

FORMAT = "tokgen-pipeline"
VERSION = 1


@dataclass
class PipelineOutput:
    """samples: decoded (B, C, *S) in the data range, or None when only codes were asked for;
    codes: one LongTensor (B, *grid) per level, top first ((B, *grid, depth) for code stacks)."""

    samples: torch.Tensor | None
    codes: list[torch.Tensor]


class TokgenPipeline:
    """A tokenizer and one prior per level (top first) that belong together: the priors model the
    tokenizer's code grids for inputs of ``input_shape`` (C, *S). ``class_names`` name the class labels."""

    def __init__(self, tokenizer: Tokenizer, priors: list[Prior], input_shape: tuple[int, ...],
                 class_names: list[str] | None = None):
        if len(priors) != tokenizer.num_levels:
            raise ValueError(f"the tokenizer has {tokenizer.num_levels} level(s) but {len(priors)} prior(s) were given")
        self.tokenizer, self.priors = tokenizer.eval(), [p.eval() for p in priors]
        self.input_shape = tuple(input_shape)
        self.class_names = class_names
        self.dtype = torch.float32  # inference precision: the networks run under autocast to it (see ``to``)
        self._check_shapes()

    def _check_shapes(self) -> None:
        shapes = self.tokenizer.code_shapes(self.input_shape)
        for level, (prior, shape, k) in enumerate(zip(self.priors, shapes, self.tokenizer.codebook_sizes)):
            if tuple(prior.config.grid_shape) != tuple(shape) or prior.config.vocab_size != k:
                raise ValueError(
                    f"level-{level} prior models {tuple(prior.config.grid_shape)} grids of {prior.config.vocab_size} "
                    f"codes, but the tokenizer makes {tuple(shape)} grids of {k} codes: they do not belong together"
                )
            # a prior may model the first k stages of a residual quantizer's stacks (a lower bitrate), never more
            stacked, depth = self.tokenizer.code_depth, prior.config.depth
            if bool(depth) != bool(stacked) or depth > stacked or depth != self.priors[0].config.depth:
                raise ValueError(f"level-{level} prior models code stacks of depth {depth}, but the tokenizer's codes "
                                 f"have {stacked} stages per position (0: none) and the level-0 prior's depth is "
                                 f"{self.priors[0].config.depth}: they do not belong together")

    def with_input_shape(self, input_shape: tuple[int, ...]) -> "TokgenPipeline":
        """This pipeline for inputs of another size (C, *S): the tokenizer is fully convolutional, and
        convolutional priors take any grid; a transformer prior refuses (its positions are learned)."""
        input_shape = tuple(input_shape)
        if input_shape == self.input_shape:
            return self
        shapes = self.tokenizer.code_shapes(input_shape)
        priors = [p.with_grid(shape, shapes[level - 1] if level > 0 else None)
                  for level, (p, shape) in enumerate(zip(self.priors, shapes))]
        resized = TokgenPipeline(self.tokenizer, priors, input_shape, self.class_names)
        resized.dtype = self.dtype
        return resized

    @property
    def modality(self) -> str:
        return self.tokenizer.modality

    @property
    def num_classes(self) -> int:
        return self.priors[0].config.num_classes

    @property
    def null_class(self) -> bool:
        """Whether every class-conditional prior learned the "no class" label (NULL_CLASS): then the pipeline also
        models p(codes) without a class (likelihoods, compression) and can sample with guidance."""
        return bool(self.num_classes) and all(p.config.null_class for p in self.priors if p.config.num_classes)

    @property
    def num_tokens(self) -> int:
        """Codes per input, all levels."""
        return sum(p.num_tokens for p in self.priors)

    @property
    def device(self) -> torch.device:
        return next(self.tokenizer.parameters()).device

    def to(self, device=None, dtype=None) -> "TokgenPipeline":
        """Move the models to ``device`` ("auto": CUDA, then MPS, then CPU) and run them in ``dtype`` (fp32, bf16,
        fp16: autocast; the weights stay fp32, and the quantizer and the compression coder stay exact)."""
        if device is not None:
            device = resolve_device(device)
            self.tokenizer.to(device)
            for p in self.priors:
                p.to(device)
        if dtype is not None:
            self.dtype = resolve_dtype(dtype)
        return self

    def autocast(self):
        """The precision context every pipeline computation runs in."""
        return autocast(self.device, self.dtype)

    def fingerprint(self) -> str:
        """Hex SHA-256 naming this exact tokenizer + priors combination."""
        h = hashlib.sha256(self.tokenizer.fingerprint().encode())
        for p in self.priors:
            h.update(p.fingerprint().encode())
        return h.hexdigest()

    # ---- saving -------------------------------------------------------------------------------
    @classmethod
    def from_runs(cls, tokenizer_path, prior_paths: list, class_names: list[str] | None = None) -> "TokgenPipeline":
        """Assemble from training runs, checking every prior was trained on this tokenizer's tokens.

        ``class_names`` default to those the priors' token folder recorded (a folder's subfolder names)."""
        tokenizer = load_tokenizer(tokenizer_path)
        fp, priors, input_shape = tokenizer.fingerprint(), [], None
        for path in prior_paths:
            folder, info = read_prior_run(path)
            if info is not None:
                if info["tokenizer_fingerprint"] != fp:
                    raise ValueError(f"the prior in {path} was trained on tokens of another tokenizer "
                                     f"({info['tokenizer_fingerprint'][:12]}, not {fp[:12]})")
                input_shape = tuple(info["input_shape"])
                class_names = class_names or info.get("class_names")
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
    def from_pretrained(cls, path, map_location="cpu", dtype=None) -> "TokgenPipeline":
        """The pipeline saved in ``path``, on ``map_location`` ("auto" picks CUDA, MPS or CPU), running in ``dtype``."""
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
        return pipe.to(map_location, dtype)

    def class_index(self, value: str | int) -> int:
        """A class given by name (``class_names``) or by index -> its index; a clear error otherwise."""
        if not self.num_classes:
            raise ValueError("this pipeline is unconditional: it has no classes")
        if self.class_names and str(value) in self.class_names:
            return self.class_names.index(str(value))
        try:
            index = int(value)
        except (TypeError, ValueError):
            names = f": one of {', '.join(self.class_names)}" if self.class_names else ""
            raise ValueError(f"unknown class {value!r}{names} (or an index in [0, {self.num_classes}))") from None
        if not 0 <= index < self.num_classes:
            raise ValueError(f"class index {index} is not in [0, {self.num_classes})")
        return index

    # ---- generation ---------------------------------------------------------------------------
    def labels(self, batch_size: int, class_labels) -> torch.Tensor | None:
        """``class_labels`` (one label, or one per row; NULL_CLASS for "no class" when the priors learned it) as a
        (batch_size,) tensor on the device, checked."""
        labels = check_class_labels(class_labels, batch_size, self.num_classes, null_class=self.null_class,
                                    who="this pipeline")
        return labels.to(self.device) if labels is not None else None

    @torch.no_grad()
    def sample_codes(self, batch_size: int = 1, class_labels=None, options: SamplingOptions | None = None, *,
                     generator: torch.Generator | None = None, prefixes: list[torch.Tensor | None] | None = None,
                     progress=None, **knobs) -> list[torch.Tensor]:
        """Codes for every level, top first, each level conditioned on the one above.

        options (or its fields as keywords): ``SamplingOptions``; guidance applies to the class-conditional
        levels. prefixes: per level, (B, P) known codes in raster order (``complete``).
        """
        options = SamplingOptions.of(options, **knobs)
        labels = self.labels(batch_size, class_labels)
        if options.guidance != 1.0 and labels is None:
            raise ValueError(f"guidance {options.guidance} is for class-conditional pipelines; this one is unconditional")
        codes: list[torch.Tensor] = []
        with self.autocast():
            for level, prior, cond, prior_labels in walk_levels(self.priors, codes, labels):
                prefix = prefixes[level] if prefixes is not None else None
                level_options = options if prior_labels is not None else options.unguided()
                codes.append(sample(prior, batch_size, prior_labels, cond, level_options, generator=generator,
                                    prefix=prefix, progress=progress))
        return codes

    @torch.no_grad()
    def decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Codes per level (B, *grid), top first -> (B, C, *S) in the data range (float32). Code stacks
        (B, *grid, k) decode with any first k stages (fewer: coarser)."""
        with self.autocast():
            return self.tokenizer.decode_clamped([c.to(self.device) for c in codes]).float()

    @property
    def code_depth(self) -> int:
        """Stages per position the priors model (0: no code stacks); at most the tokenizer's ``code_depth``."""
        return self.priors[0].config.depth

    def code_tensor_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Input (C, *S) -> one item's codes per level as the priors model them: the grid, (*grid, code_depth) for
        code stacks."""
        depth = self.code_depth
        return [(*grid, depth) if depth else tuple(grid) for grid in self.tokenizer.code_shapes(tuple(input_shape))]

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, C, *S) -> codes per level (B, *grid), top first; (B, *grid, depth) for code stacks, the first
        ``code_depth`` stages (the ones the priors model)."""
        stages = {"num_stages": self.code_depth} if self.code_depth else {}
        with self.autocast():
            return self.tokenizer.encode_levels(x.to(self.device), **stages)

    def __call__(self, batch_size: int = 1, class_labels=None, options: SamplingOptions | None = None, *,
                 generator: torch.Generator | None = None, output_type: str = "decoded", progress=None,
                 **knobs) -> PipelineOutput:
        """Sample ``batch_size`` inputs (of ``class_labels`` for a class-conditional pipeline); ``options`` or its
        fields as keywords (``temperature``, ``top_k``, ``top_p``, ``guidance``, ``use_cache``,
        ``static_cache``)."""
        if output_type not in ("decoded", "codes"):
            raise ValueError(f"output_type must be 'decoded' or 'codes', got {output_type!r}")
        codes = self.sample_codes(batch_size, class_labels, options, generator=generator, progress=progress, **knobs)
        return PipelineOutput(self.decode(codes) if output_type == "decoded" else None, codes)

    @torch.no_grad()
    def sample_long(self, length: int, batch_size: int = 1, class_labels=None, options: SamplingOptions | None = None,
                    *, overlap: float = 0.5, generator=None, progress=None, **knobs) -> PipelineOutput:
        """Samples longer than the training inputs along the first axis (video frames, audio samples).

        Convolutional priors take the longer grid directly; a transformer, whose positions are learned
        for the training length, slides a window over time: each new window keeps the last ``overlap``
        of the previous one as its prefix and samples the rest (VideoGPT-style).
        """
        options = SamplingOptions.of(options, **knobs)
        shape = (self.input_shape[0], length, *self.input_shape[2:])
        if all(p.shape_agnostic for p in self.priors):
            return self.with_input_shape(shape)(batch_size, class_labels, options, generator=generator,
                                                progress=progress)
        if len(self.priors) != 1:
            raise ValueError("sliding-window sampling needs a single-level pipeline (or convolutional priors)")
        if not options.use_cache:
            raise ValueError("sampling beyond the training length runs with the cache only")
        total = self.tokenizer.code_shapes(shape)[0][0]
        prior, labels = self.priors[0], self.labels(batch_size, class_labels)
        window = prior.config.grid_shape[0]
        keep = int(window * overlap)
        if not 0 < keep < window:
            raise ValueError(f"overlap {overlap} leaves no context or no new steps in a window of {window}")
        with self.autocast():
            codes = sample(prior, batch_size, labels, None, options, generator=generator, progress=progress)
            while codes.shape[1] < total:
                new = sample(prior, batch_size, labels, None, options, generator=generator,
                             prefix=codes[:, -keep:].flatten(1), progress=progress)
                codes = torch.cat([codes, new[:, keep:]], dim=1)
        codes = [codes[:, :total]]
        return PipelineOutput(self.decode(codes), codes)

    # ---- likelihoods --------------------------------------------------------------------------
    @torch.no_grad()
    def nll_bits(self, codes: list[torch.Tensor], class_labels=None) -> torch.Tensor:
        """Exact -log2 p(codes) per level under the priors (full forward), float64 (B, levels)."""
        codes = [c.to(self.device) for c in codes]
        labels = self.labels(codes[0].shape[0], class_labels)
        with self.autocast():
            bits = [prior.nll(codes[level], prior_labels, cond).double() / math.log(2)
                    for level, prior, cond, prior_labels in walk_levels(self.priors, codes, labels)]
        return torch.stack(bits, 1)

    @torch.no_grad()
    def bits_per_dim(self, x: torch.Tensor, class_labels=None) -> torch.Tensor:
        """Exact -log2 p(codes of x) per dimension of x, (B,): the lossless code length of the tokens."""
        return (self.nll_bits(self.encode(x), class_labels).sum(1) / math.prod(x.shape[1:])).float()

    def complete(self, x: torch.Tensor, known_fraction: float = 0.5, class_labels=None,
                 options: SamplingOptions | None = None, *, generator=None, **knobs) -> PipelineOutput:
        """Keep the first ``known_fraction`` of x along its first axis (image rows, video frames, audio
        time), sample the rest of every level's codes, and decode."""
        if not 0 <= known_fraction <= 1:
            raise ValueError(f"known_fraction must lie in [0, 1], got {known_fraction}")
        codes = self.encode(x)
        prefixes = []
        for c in codes:
            rows = int(c.shape[1] * known_fraction)
            prefixes.append(c.flatten(1)[:, : rows * math.prod(c.shape[2:])])
        out = self.sample_codes(x.shape[0], class_labels, options, generator=generator, prefixes=prefixes, **knobs)
        return PipelineOutput(self.decode(out), out)
