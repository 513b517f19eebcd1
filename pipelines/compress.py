"""``tokgen compress`` / ``tokgen decompress``: lossless coding of an input's tokens with the prior.

compress: input file -> tokenizer codes (exactly ``tokgen encode``'s) -> arithmetic coding under the
prior's conditionals, top level first, each lower level conditioned on the one above -> a small file
(:mod:`pipelines.bitstream`). decompress: the file -> the same codes -> the tokenizer's decoding.
The codec is lossy only through the tokenizer; the codes survive bit for bit.

Exactness. The decoder must rebuild every integer CDF bit for bit, so both sides compute the logits
the same way: through the prior's incremental ``start_state``/``step`` path (never the full forward),
on the CPU, with a float64 copy of the prior, single-threaded, and with the same batch size (1 for
the CLI; :func:`compress_batch` streams decode with :func:`decompress_batch` over the same batch).
Single-threaded float64 makes the CDFs reproducible on one machine; across machines with different
CPU kernels an ulp may still differ, which then changes a CDF with probability ~1e-10 per entry.

Checks. The file's CRC32 (over the full pipeline fingerprint, header and payload) is verified before
decoding: another pipeline, a flipped, cut or appended byte are refused at once. After the codes the
stream carries 8 check bits (a CRC of the codes, coded uniformly: exactly 1 byte), so a decoder whose
numerics went out of step with the encoder's is refused too (miss rate 1/256) instead of writing
garbage.

Inputs of another size than the pipeline's: the header stores the input shape and the coder uses
``pipe.with_input_shape`` (convolutional priors take any grid; a transformer prior refuses).

Code stacks (a residual quantizer's (*grid, depth) per level) are coded stage by stage in the priors' order,
(position, stage) with the stages fastest; the depth follows from the pipeline, so the container is the same.

Library:
  compress_batch(pipe, x_or_codes, class_labels=None) -> list[bytes]
  decompress_batch(pipe, blobs) -> list[Decompressed]
  compress(pipe, x_or_codes, class_label=None) -> bytes;  decompress(pipe, blob) -> Decompressed
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.codes import save_codes
from data.files import MAX_INPUT_SIZE, check_input_size, write_output
from data.modalities import value_span
from harness.devices import add_device_arguments
from harness.output import add_output_arguments, emit
from pipelines import bitstream
from pipelines.arithmetic import ArithmeticDecoder, ArithmeticEncoder, precision_for, quantize_cdf
from pipelines.bitstream import NULL_LABEL, BitstreamError
from pipelines.pipeline import TokgenPipeline
from stage1_tokenizer.codec import read_file
from stage1_tokenizer.metrics import psnr
from stage2_prior.base import NULL_CLASS, check_class_labels, walk_levels

__all__ = ["CODING_DTYPE", "CHECK_BITS", "PriorCoder", "Decompressed", "coder_for", "compress", "compress_batch",
           "decompress", "decompress_batch", "codes_content", "compress_main", "decompress_main"]

CODING_DTYPE = torch.float64  # the priors run in this dtype for coding (see the module docstring)
CHECK_BITS = 8  # bits of the codes' CRC coded after them (a decoder out of step is caught)


@dataclass
class Decompressed:
    """codes: one LongTensor (*grid) per level, top first ((*grid, depth) for code stacks); input_shape: (C, *S) the
    tokenizer decodes to."""

    codes: list[torch.Tensor]
    input_shape: tuple[int, ...]
    class_label: int | None
    header_bytes: int = 0
    payload_bytes: int = 0


@dataclass
class Encoded:
    """What the encoder knows about one stream: the file and the quantized model's code lengths."""

    blob: bytes
    header_bytes: int
    quantized_bits: list[float] = field(default_factory=list)  # per level, -log2 of the integer CDF mass


@contextlib.contextmanager
def deterministic_cpu():
    """no_grad + one intra-op thread: CPU kernels then reduce in a fixed order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)


def codes_content(codes: list[torch.Tensor]) -> bytes:
    """The bytes of one sample's codes (levels top first, int32 little-endian)."""
    return b"".join(np.ascontiguousarray(c.detach().cpu().numpy(), dtype="<i4").tobytes() for c in codes)


def codes_check(codes: list[torch.Tensor]) -> int:
    """The CHECK_BITS the stream carries after the codes: the low bits of their CRC32."""
    return zlib.crc32(codes_content(codes)) & ((1 << CHECK_BITS) - 1)


class PriorCoder:
    """Float64 CPU copies of a pipeline's priors and the coding loops; build once, code many."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.fingerprint_hex = pipe.fingerprint()
        self.fingerprint = bitstream.fingerprint_bytes(self.fingerprint_hex)
        self._priors: dict[tuple[int, ...], list] = {}
        self.sizes = list(pipe.tokenizer.codebook_sizes)
        self.precision = max(precision_for(k) for k in self.sizes)
        self.channels = int(pipe.tokenizer.config.in_channels)
        self.num_classes = int(pipe.num_classes)

    # ---- shapes and labels ----------------------------------------------------------------------
    def priors_for(self, input_shape) -> list:
        """The coding copies of the priors for inputs (C, *S) (resized for another size when they can be)."""
        key = tuple(int(d) for d in input_shape)
        if key not in self._priors:
            pipe = self.pipe if key == tuple(self.pipe.input_shape) else self.pipe.with_input_shape(key)
            self._priors[key] = [copy.deepcopy(p).to(device="cpu", dtype=CODING_DTYPE).eval() for p in pipe.priors]
        return self._priors[key]

    def code_shapes(self, input_shape) -> list[tuple[int, ...]]:
        """One item's codes per level for an input (C, *S): the grid (+ the stages of a code stack); ValueError
        when the priors cannot code that size."""
        shapes = self.pipe.code_tensor_shapes(tuple(input_shape))
        for level, (prior, shape) in enumerate(zip(self.priors_for(input_shape), shapes)):
            if tuple(prior.code_shape) != shape:
                raise ValueError(f"the level-{level} prior models {tuple(prior.code_shape)} codes, "
                                 f"but an input of shape {tuple(input_shape)} makes {shape}")
        return shapes

    @property
    def null_class(self) -> bool:
        """Whether every class-conditional prior learned the "no class" label: then a class need not be given."""
        return self.pipe.null_class

    def _labels(self, batch: int, class_labels) -> torch.Tensor | None:
        if class_labels is None and self.null_class:
            class_labels = NULL_CLASS  # p(codes) without a class: nobody needs to know the file's class
        labels = check_class_labels(class_labels, batch, self.num_classes, null_class=self.null_class,
                                    who="this pipeline")
        return labels.cpu().clone() if labels is not None else None

    # ---- encoding ----------------------------------------------------------------------------------
    def encode(self, codes: list[torch.Tensor], input_shape, class_labels=None) -> list[Encoded]:
        """codes: per level (B, *grid) or (B, *grid, depth); input_shape (C, *S). One stream per sample, one step
        call per code (every stage of a stack)."""
        codes = [c.detach().to("cpu", torch.long) for c in codes]
        if len(codes) != len(self.sizes):
            raise ValueError(f"got {len(codes)} code level(s); this pipeline has {len(self.sizes)}")
        batch = codes[0].shape[0]
        input_shape = tuple(int(d) for d in input_shape)
        shapes = self.code_shapes(input_shape)
        for level, (c, shape, k) in enumerate(zip(codes, shapes, self.sizes)):
            if tuple(c.shape) != (batch, *shape):
                depth = self.pipe.code_depth  # stacks of another depth: say how to make the right ones
                hint = (f" (this pipeline's priors model {depth} stages a position: `tokgen encode --stages {depth}`)"
                        if depth and c.dim() == len(shape) + 1 and c.shape[-1] != depth else "")
                raise ValueError(f"level-{level} codes must be ({batch}, {shape}) for inputs {input_shape}, "
                                 f"got {tuple(c.shape)}{hint}")
            if c.numel() and (int(c.min()) < 0 or int(c.max()) >= k):
                raise ValueError(f"level-{level} codes out of range [0, {k}): another tokenizer's codes?")
        labels = self._labels(batch, class_labels)
        rows = torch.arange(batch)
        los = [[] for _ in range(batch)]
        his = [[] for _ in range(batch)]
        qbits = np.zeros((batch, len(codes)))
        priors = self.priors_for(input_shape)
        with deterministic_cpu():
            for level, prior, cond, prior_labels in walk_levels(priors, codes, labels):
                state = prior.start_state(batch, prior_labels, cond)
                flat = codes[level].flatten(1)
                lo_l = np.empty((batch, flat.shape[1]), dtype=np.int64)
                hi_l = np.empty_like(lo_l)
                for t in range(flat.shape[1]):
                    logits = prior.step(state, flat[:, t - 1] if t else None)
                    cdf = quantize_cdf(logits, self.precision)
                    sym = flat[:, t]
                    lo_l[:, t] = cdf[rows, sym].numpy()
                    hi_l[:, t] = cdf[rows, sym + 1].numpy()
                qbits[:, level] = -(np.log2(hi_l - lo_l) - self.precision).sum(1)
                for i in range(batch):
                    los[i].extend(lo_l[i].tolist())
                    his[i].extend(hi_l[i].tolist())
        out = []
        spatial = input_shape[1:]
        for i in range(batch):
            enc = ArithmeticEncoder(self.precision)
            enc.encode_intervals(los[i], his[i])
            check = codes_check([c[i] for c in codes])
            enc.encode_interval(check * (unit := (1 << self.precision) >> CHECK_BITS), (check + 1) * unit)
            payload = enc.finish()
            label = None if labels is None else int(labels[i])  # NULL_CLASS is bitstream's NULL_LABEL
            blob = bitstream.pack(self.fingerprint, spatial, payload, label)
            out.append(Encoded(blob, bitstream.header_size(spatial, label), qbits[i].tolist()))
        return out

    # ---- decoding ----------------------------------------------------------------------------------
    def _containers(self, blobs: list[bytes], max_input_size: int) -> list[bitstream.Container]:
        """Parse and verify every stream, and refuse claimed sizes above ``max_input_size`` values before anything
        is allocated: the check is a CRC anyone with the pipeline can compute, so the header is untrusted."""
        containers = []
        for i, blob in enumerate(blobs):
            where = f"stream {i}: " if len(blobs) > 1 else ""
            try:
                c = bitstream.read(blob)
                bitstream.check_pipeline(c.header, self.fingerprint)
                c.verify(self.fingerprint)  # nothing is decoded from a file that does not verify
                check_input_size(c.header.input_shape, max_input_size)
            except BitstreamError as err:
                raise BitstreamError(f"{where}{err}") from None
            containers.append(c)
        if any(c.header.input_shape != containers[0].header.input_shape for c in containers):
            raise ValueError("streams of different input shapes: decompress them separately")
        return containers

    def decode(self, blobs: list[bytes], max_input_size: int = MAX_INPUT_SIZE) -> list[Decompressed]:
        """Decode streams made together by :meth:`encode` (same batch); verifies every one. A stream claiming an
        input of more than ``max_input_size`` values (pixels, frames x pixels, samples) is refused at once."""
        if not blobs:
            return []
        containers = self._containers(blobs, max_input_size)
        input_shape = (self.channels, *containers[0].header.input_shape)
        shapes = self.code_shapes(input_shape)
        priors = self.priors_for(input_shape)
        labels = self._header_labels(containers)
        batch = len(blobs)
        decoders = [ArithmeticDecoder(c.payload, self.precision) for c in containers]
        codes: list[torch.Tensor] = []
        with deterministic_cpu():
            for level, prior, cond, prior_labels in walk_levels(priors, codes, labels):
                shape = shapes[level]
                n = math.prod(shape)
                out = torch.zeros(batch, n, dtype=torch.long)
                state = prior.start_state(batch, prior_labels, cond)
                for t in range(n):
                    logits = prior.step(state, out[:, t - 1] if t else None)
                    cdf = quantize_cdf(logits, self.precision).numpy()
                    out[:, t] = torch.tensor([d.decode(cdf[i]) for i, d in enumerate(decoders)])
                codes.append(out.view(batch, *shape))
        uniform = np.arange((1 << CHECK_BITS) + 1, dtype=np.int64) * ((1 << self.precision) >> CHECK_BITS)
        results = []
        for i, c in enumerate(containers):
            sample = [lvl[i].clone() for lvl in codes]
            if decoders[i].decode(uniform) != codes_check(sample):
                where = f"stream {i}: " if batch > 1 else ""
                raise BitstreamError(
                    f"{where}the decoded codes fail their check although the file is intact: this machine "
                    "computes the prior's probabilities differently from the one that compressed it (another "
                    "CPU or library version; or the stream was coded in a batch of another size)")
            results.append(Decompressed(sample, input_shape, c.header.class_label, c.header_bytes, len(c.payload)))
        return results

    def _header_labels(self, containers) -> torch.Tensor | None:
        labels = [c.header.class_label for c in containers]
        if self.num_classes == 0:
            if any(lab is not None for lab in labels):
                raise BitstreamError("a class label in a file for an unconditional pipeline")
            return None
        if any(lab is None for lab in labels):
            raise BitstreamError("no class label in a file for a class-conditional pipeline")
        if any(lab == NULL_LABEL for lab in labels) and not self.null_class:
            raise BitstreamError("the file was coded without a class, but this pipeline's priors have no "
                                 "'no class' label")
        if any(lab >= self.num_classes for lab in labels):
            raise BitstreamError(f"class label out of range [0, {self.num_classes})")
        return torch.tensor(labels, dtype=torch.long)


# ---- library entry points (with a per-pipeline coder cache) ----------------------------------------
_CODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def coder_for(pipe) -> PriorCoder:
    """The cached :class:`PriorCoder` of ``pipe`` (rebuilt when its weights changed)."""
    coder = _CODERS.get(pipe)
    if coder is None or coder.fingerprint_hex != pipe.fingerprint():
        coder = _CODERS[pipe] = PriorCoder(pipe)
    return coder


def _as_codes(pipe, x_or_codes, input_shape=None) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """An input batch (B, C, *S) or codes (per level (B, *grid) or (B, *grid, depth), or one tensor for one level) ->
    (codes per level, input shape (C, *S))."""
    tok = pipe.tokenizer
    if isinstance(x_or_codes, torch.Tensor) and x_or_codes.is_floating_point():
        x = x_or_codes
        if x.dim() != tok.dims + 2:
            raise ValueError(f"expected inputs (B, C, {', '.join('*' * tok.dims)}), got {tuple(x.shape)}")
        return [c.cpu() for c in pipe.encode(x)], tuple(x.shape[1:])
    codes = [x_or_codes] if isinstance(x_or_codes, torch.Tensor) else list(x_or_codes)
    codes = [torch.as_tensor(c).long().cpu() for c in codes]
    if input_shape is None:
        input_shape = tuple(pipe.input_shape)
        shapes = pipe.code_tensor_shapes(input_shape)
        if [tuple(c.shape[1:]) for c in codes] != [tuple(s) for s in shapes]:
            grid = codes[0].shape[1 : 1 + tok.dims]  # without the stages of a code stack
            spatial = tuple(n * f for n, f in zip(grid, tok.downsampling))
            input_shape = (int(tok.config.in_channels), *spatial)
    return codes, tuple(input_shape)


def compress_batch(pipe, x_or_codes, class_labels=None, input_shape=None) -> list[bytes]:
    """B inputs (B, C, *S) or their codes (per level (B, *grid)) -> B compressed files, coded together
    (one prior ``step`` per position for the whole batch). Decode them with :func:`decompress_batch`
    over the same batch: CPU kernels are not batch-size invariant, so a stream decoded alone may not
    verify (it is then refused, never wrong)."""
    codes, shape = _as_codes(pipe, x_or_codes, input_shape)
    return [e.blob for e in coder_for(pipe).encode(codes, shape, class_labels)]


def decompress_batch(pipe, blobs: list[bytes], max_input_size: int = MAX_INPUT_SIZE) -> list[Decompressed]:
    """The codes (and input shape, class) of files made together by :func:`compress_batch`; verifies each."""
    return coder_for(pipe).decode(list(blobs), max_input_size)


def compress(pipe, x_or_codes, class_label=None, input_shape=None) -> bytes:
    """One sample: x (C, *S) / (1, C, *S), or its codes per level ((*grid) or (1, *grid); code stacks
    (*grid, depth) or (1, *grid, depth))."""
    tok = pipe.tokenizer
    if isinstance(x_or_codes, torch.Tensor) and x_or_codes.is_floating_point():
        if x_or_codes.dim() == tok.dims + 1:
            x_or_codes = x_or_codes[None]
    else:
        levels = [x_or_codes] if isinstance(x_or_codes, torch.Tensor) else list(x_or_codes)
        levels = [torch.as_tensor(c) for c in levels]
        item_dims = tok.dims + (1 if tok.code_depth else 0)  # one item's codes: the grid (+ the stages)
        x_or_codes = [c[None] if c.dim() == item_dims else c for c in levels]
    blobs = compress_batch(pipe, x_or_codes, None if class_label is None else [class_label], input_shape)
    if len(blobs) != 1:
        raise ValueError(f"compress codes one sample; got {len(blobs)} (use compress_batch)")
    return blobs[0]


def decompress(pipe, blob: bytes, max_input_size: int = MAX_INPUT_SIZE) -> Decompressed:
    """The codes (and input shape, class) of one file made by :func:`compress`; refuses a damaged or foreign one,
    and one claiming an input of more than ``max_input_size`` values."""
    return coder_for(pipe).decode([blob], max_input_size)[0]


# ---- CLI ---------------------------------------------------------------------------------------------
def add_compress_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", type=Path, help="pipeline folder (pipeline.json)")
    p.add_argument("input", type=Path, help="image, clip or video file")
    p.add_argument("--out", required=True, type=Path, help="compressed file to write")
    p.add_argument("--report", type=Path, help="write a JSON report (sizes, NLL, bits per dim, PSNR)")
    p.add_argument("--class", dest="class_label",
                   help="class name or index (class-conditional pipelines; default: code without a class when the "
                        "priors learned one, as priors trained with class_dropout do)")
    p.add_argument("--size", type=int, help="resize the shorter side first (as `tokgen encode --size`)")
    add_device_arguments(p)
    add_output_arguments(p)


def add_decompress_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", type=Path, help="the pipeline folder that compressed the file")
    p.add_argument("file", type=Path, help="file from `tokgen compress`")
    p.add_argument("--out", required=True, type=Path, help="decoded output (e.g. .png)")
    p.add_argument("--codes-out", type=Path, help="also save the codes, as `tokgen encode` does (.npz)")
    p.add_argument("--max-input-size", type=int, default=MAX_INPUT_SIZE,
                   help="refuse files claiming an input of more values than this (pixels, frames x pixels or "
                        f"samples), before decoding anything (default: {MAX_INPUT_SIZE:,}, Pillow's limit)")
    add_output_arguments(p)
    add_device_arguments(p)


def compress_main(argv=None, args=None) -> dict:
    """Compress one input file; returns the report."""
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen compress")
        add_compress_arguments(parser)
        args = parser.parse_args(argv)
    pipe = TokgenPipeline.from_pretrained(args.pipeline, map_location=args.device, dtype=args.dtype)
    x = read_file(pipe.tokenizer, args.input, args.size)
    coder = coder_for(pipe)
    try:
        sized = pipe.with_input_shape(tuple(x.shape))
    except ValueError as err:
        hint = " (pass --size to resize the shorter side first)" if pipe.modality != "audio" else " (pass --size)"
        raise ValueError(f"{args.input} reads as {tuple(x.shape)}, but this pipeline codes {tuple(pipe.input_shape)}: "
                         f"{err}{hint}") from None
    codes = [c.cpu() for c in pipe.encode(x[None])]  # exactly what `tokgen encode` computes
    if args.class_label is not None:
        labels = [pipe.class_index(args.class_label)]
    else:  # a prior that learned "no class" codes without one; one that did not asks for it (a clear error)
        labels = [NULL_CLASS] if coder.null_class else None
    encoded = coder.encode(codes, tuple(x.shape), labels)[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(encoded.blob)

    nll = sized.nll_bits(codes, labels)[0].cpu().numpy()
    dims = math.prod(x.shape)
    recon = pipe.decode(codes)[0].cpu()
    nbytes = len(encoded.blob)
    report = {
        "input": str(args.input), "output": str(args.out), "input_shape": list(x.shape),
        "code_shapes": [list(c.shape[1:]) for c in codes], "class_label": labels[0] if labels and labels[0] != NULL_CLASS else None,
        "coded_without_class": labels == [NULL_CLASS],
        "bytes": nbytes, "bits": 8 * nbytes, "header_bytes": encoded.header_bytes,
        "payload_bytes": nbytes - encoded.header_bytes,
        # the float model (the priors as trained, full forward): what evaluate-prior reports
        "nll_bits": float(nll.sum()), "nll_bits_per_level": [float(v) for v in nll],
        # the integer CDFs the coder used (the payload's ideal length)
        "nll_bits_quantized": float(sum(encoded.quantized_bits)),
        "nll_bits_quantized_per_level": [float(v) for v in encoded.quantized_bits],
        "bits_per_dim": 8 * nbytes / dims, "nll_bits_per_dim": float(nll.sum()) / dims,
        "overhead_bits": 8 * nbytes - float(nll.sum()), "precision": coder.precision, "check_bits": CHECK_BITS,
        "psnr_db": float(psnr(recon[None], x[None], value_span(pipe.modality))[0]),
        "psnr_peak": value_span(pipe.modality),
    }
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    emit(args, f"{args.input} {tuple(x.shape)} -> {args.out}: {nbytes} bytes ({report['bits_per_dim']:.4f} bits/dim; "
               f"model NLL {report['nll_bits'] / 8:.1f} bytes), PSNR {report['psnr_db']:.2f} dB", report)
    return report


def decompress_main(argv=None, args=None) -> list[torch.Tensor]:
    """Decompress one file; returns the codes (per level, (*grid) or (*grid, depth))."""
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen decompress")
        add_decompress_arguments(parser)
        args = parser.parse_args(argv)
    if not args.file.is_file():
        raise FileNotFoundError(f"compressed file {args.file} not found")
    blob = args.file.read_bytes()
    try:
        check_input_size(bitstream.read(blob).header.input_shape, args.max_input_size)  # before the pipeline loads
    except BitstreamError as err:
        raise BitstreamError(f"{args.file}: {err}") from None
    pipe = TokgenPipeline.from_pretrained(args.pipeline, map_location=args.device, dtype=args.dtype)
    try:
        result = decompress(pipe, blob, args.max_input_size)
    except BitstreamError as err:
        raise BitstreamError(f"{args.file}: {err}") from None
    x = pipe.decode([c[None] for c in result.codes])[0].cpu()
    write_output(pipe.modality, x, args.out, pipe.tokenizer.sample_rate)
    if args.codes_out:
        save_codes(args.codes_out, [c[None] for c in result.codes], pipe.tokenizer.codebook_sizes)
    emit(args, f"{args.file} -> {args.out} {tuple(x.shape)}, codes {[tuple(c.shape) for c in result.codes]}",
         {"file": str(args.file), "output": str(args.out), "input_shape": list(x.shape),
          "code_shapes": [list(c.shape) for c in result.codes], "class_label": result.class_label})
    return result.codes
