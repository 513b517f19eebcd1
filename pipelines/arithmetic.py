"""Lossless entropy coding of discrete code sequences with a prior's conditionals.

Two pieces:

* :func:`quantize_cdf` turns a batch of logits into integer CDFs with an exact
  total of ``2**precision`` where every symbol has frequency >= 1, so every
  symbol (even one the model considers impossible) stays encodable.
* :class:`ArithmeticEncoder` / :class:`ArithmeticDecoder`: a byte-oriented range
  coder (LZMA-style carry propagation through a cache byte + run of 0xFF bytes)
  with a 56-bit ``low`` register.  The range is kept in ``[2**48, 2**56)`` so the
  integer division ``range // total`` loses at most ``2**(precision-48)`` of the
  interval per symbol (negligible for ``precision <= 32``); the slack of the
  division is given to the last symbol of the alphabet, so nothing is wasted
  there either.  The flush writes the shortest byte string that identifies the
  final interval, and trailing zero bytes are stripped (the decoder pads with
  zeros), so the total overhead over ``ideal_bits`` is about one byte.

Determinism contract: the encoder and the decoder must feed *bit-identical*
logits (same model, same weights, same device/dtype, same numerics).
:func:`quantize_cdf` itself is deterministic: it computes the softmax in float64
on the CPU with NumPy, row by row, and its output for a row does not depend on
the other rows of the batch (so the encoder may quantize all rows at once while
the decoder quantizes one step at a time).  A single flipped ulp in the logits
may change a frequency and desynchronise the decoder.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Callable, List, Sequence

import numpy as np
import torch

__all__ = [
    "PRECISION",
    "MAX_PRECISION",
    "precision_for",
    "quantize_cdf",
    "ArithmeticEncoder",
    "ArithmeticDecoder",
    "encode_sequence",
    "decode_sequence",
    "ideal_bits",
]

PRECISION = 16          # default total-frequency bits (total = 2**PRECISION)
MAX_PRECISION = 32      # the coder supports totals up to 2**32

# Range coder geometry.
_STATE_BITS = 56
_TOP = 1 << _STATE_BITS            # carry bit position of `low`
_BOT = 1 << (_STATE_BITS - 8)      # renormalise while range < _BOT
_SHIFT = _STATE_BITS - 8           # position of the top byte of `low`
_LOW_MASK = _BOT - 1               # low bits kept when the top byte leaves
_CODE_MASK = _TOP - 1
_FF_THRESHOLD = 0xFF << _SHIFT
_STATE_BYTES = _STATE_BITS // 8    # bytes the decoder primes its code with


def precision_for(codebook_size: int) -> int:
    """The CDF precision tokgen codes a codebook of this size with.

    16 bits up to 1024 codes (the 1-count floor then takes at most 1/64 of the mass: <= 0.023 bits
    per token even for a certain symbol); above that ``ceil(log2 K) + 10`` bits (floor mass <= 1/1024),
    capped at ``MAX_PRECISION``.
    """
    k = int(codebook_size)
    if k < 1:
        raise ValueError(f"codebook_size must be >= 1, got {k}")
    if k <= 1024:
        return PRECISION
    precision = (k - 1).bit_length() + 10
    if precision > MAX_PRECISION:
        raise ValueError(f"codebook of {k} codes is too large for the coder (at most 2**{MAX_PRECISION - 10})")
    return precision


def _check_precision(precision: int) -> int:
    if not isinstance(precision, (int, np.integer)) or isinstance(precision, bool):
        raise TypeError(f"precision must be an int, got {type(precision).__name__}")
    precision = int(precision)
    if not 1 <= precision <= MAX_PRECISION:
        raise ValueError(f"precision must be in [1, {MAX_PRECISION}], got {precision}")
    return precision


# --------------------------------------------------------------------------- #
# Probability quantisation
# --------------------------------------------------------------------------- #
def _check_logits(x: np.ndarray, precision: int) -> None:
    if x.ndim != 2:
        raise ValueError(f"logits must have shape (B, V) or (V,), got {tuple(x.shape)}")
    batch, vocab = x.shape
    total = 1 << precision
    if vocab < 1:
        raise ValueError("logits must have at least one symbol (V >= 1)")
    if vocab >= total:
        raise ValueError(
            f"alphabet size V={vocab} needs precision > {precision} bits "
            f"(V must be < 2**precision = {total})"
        )
    if batch and not np.isfinite(x).all():
        raise ValueError("logits contain NaN or inf; cannot build a probability model")


def _cdf_rows(x: np.ndarray, precision: int) -> np.ndarray:
    """float64 logits (B, V) -> int64 CDFs (B, V + 1), row by row (see ``quantize_cdf``)."""
    batch, vocab = x.shape
    total = 1 << precision
    cdf = np.zeros((batch, vocab + 1), dtype=np.int64)
    if batch == 0:
        return cdf
    spare = total - vocab                    # counts left after the 1-per-symbol floor
    offsets = np.arange(1, vocab + 1, dtype=np.int64)
    # Row chunks keep temporaries cache-sized; every op below is elementwise or
    # sequential along a row, so the result for a row is batch-invariant.
    step = max(1, (1 << 18) // vocab)
    for start in range(0, batch, step):
        xs = x[start:start + step]
        e = xs - xs.max(axis=1, keepdims=True)
        np.exp(e, out=e)
        np.cumsum(e, axis=1, out=e)
        e /= e[:, -1:].copy()                # monotone, in [0, 1], last == 1 exactly
        e *= spare
        e += 0.5
        np.floor(e, out=e)                   # monotone rounding, last == spare
        q = cdf[start:start + step, 1:]
        q[...] = e
        q += offsets
    cdf[:, vocab] = total
    return cdf


def quantize_cdf(logits: torch.Tensor, precision: int = PRECISION) -> torch.Tensor:
    """Quantise logits ``(B, V)`` (or ``(V,)``) into integer CDFs ``(B, V+1)`` (or ``(V+1,)``).

    ``cdf[:, 0] == 0``, ``cdf[:, V] == 2**precision`` and ``cdf[:, j+1] - cdf[:, j] >= 1``.
    Frequencies are ``1 + (share of the remaining 2**precision - V counts)``, where
    the shares come from rounding the *cumulative* softmax mass, so the total is
    exact by construction and each frequency is within one count of
    ``1 + p * (2**precision - V)`` (no bias towards any symbol).

    The softmax is computed in float64 on the CPU (NumPy), independently per row.
    Encoder and decoder must pass bit-identical logits.
    Raises ``ValueError`` if ``V >= 2**precision`` or if logits contain NaN/inf.
    """
    precision = _check_precision(precision)
    if isinstance(logits, torch.Tensor):
        x = logits.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        x = np.asarray(logits, dtype=np.float64)
    squeeze = x.ndim == 1
    if squeeze:
        x = x[None, :]
    _check_logits(x, precision)
    cdf = _cdf_rows(np.ascontiguousarray(x), precision)
    out = torch.from_numpy(cdf)
    return out[0] if squeeze else out


# --------------------------------------------------------------------------- #
# Helpers for cdf rows of various types
# --------------------------------------------------------------------------- #
def _row(cdf_row):
    """Return a cheaply indexable row: list/tuple as is, tensors -> numpy int64."""
    if isinstance(cdf_row, (list, tuple)):
        return cdf_row
    if isinstance(cdf_row, torch.Tensor):
        cdf_row = cdf_row.detach().to("cpu").numpy()
    arr = np.asarray(cdf_row)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"cdf_row must be 1-D (V+1 entries), got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"cdf_row must hold integers, got dtype {arr.dtype}")
    return arr


# --------------------------------------------------------------------------- #
# Encoder
# --------------------------------------------------------------------------- #
class ArithmeticEncoder:
    """Range encoder. Call :meth:`encode` per symbol, then :meth:`finish` once."""

    def __init__(self, precision: int = PRECISION):
        self.precision = _check_precision(precision)
        self.total = 1 << self.precision
        self._low = 0
        self._range = _TOP - 1
        self._cache = 0
        self._cache_size = 1          # the first (always-zero) byte is dropped in finish()
        self._out = bytearray()
        self._finished = False
        self.num_symbols = 0

    # -- core ------------------------------------------------------------- #
    def _shift_low(self) -> None:
        low = self._low
        if low < _FF_THRESHOLD or low >= _TOP:
            carry = low >> _STATE_BITS
            out = self._out
            out.append((self._cache + carry) & 0xFF)
            if self._cache_size > 1:
                out.extend(bytes([(0xFF + carry) & 0xFF]) * (self._cache_size - 1))
            self._cache_size = 0
            self._cache = (low >> _SHIFT) & 0xFF
        self._cache_size += 1
        self._low = (low & _LOW_MASK) << 8

    def encode_interval(self, lo: int, hi: int) -> None:
        """Encode the interval ``[lo, hi)`` of ``[0, total)`` (``lo < hi``)."""
        if self._finished:
            raise RuntimeError("encoder already finished")
        lo = int(lo)
        hi = int(hi)
        total = self.total
        if not 0 <= lo < hi <= total:
            raise ValueError(f"invalid interval [{lo}, {hi}) for total {total}")
        r = self._range >> self.precision
        self._low += r * lo
        if hi == total:
            self._range -= r * lo          # slack of the division goes to the last symbol
        else:
            self._range = r * (hi - lo)
        while self._range < _BOT:
            self._range <<= 8
            self._shift_low()
        self.num_symbols += 1

    def encode(self, symbol: int, cdf_row) -> None:
        """Encode ``symbol`` under the integer CDF ``cdf_row`` (V+1 ints, last == total)."""
        row = _row(cdf_row)
        n = len(row) - 1
        symbol = int(symbol)
        if not 0 <= symbol < n:
            raise ValueError(f"symbol {symbol} out of range for alphabet of size {n}")
        if int(row[n]) != self.total:
            raise ValueError(f"cdf_row total {int(row[n])} != 2**precision = {self.total}")
        lo = int(row[symbol])
        hi = int(row[symbol + 1])
        if hi <= lo:
            raise ValueError(f"symbol {symbol} has zero frequency (cdf not strictly increasing)")
        self.encode_interval(lo, hi)

    def encode_batch(self, symbols, cdf_rows) -> None:
        """Encode many symbols; ``cdf_rows`` is an ``(N, V+1)`` tensor/array or a list of rows."""
        los, his = _gather_intervals(symbols, cdf_rows, self.total)
        self._encode_intervals(los, his)

    def encode_intervals(self, los, his) -> None:
        """Encode many pre-gathered intervals ``[lo, hi)`` (sequences of ints, e.g. from
        cdf rows at the coded symbols); validated here, then coded in the fast loop."""
        los = [int(v) for v in los]
        his = [int(v) for v in his]
        if len(los) != len(his):
            raise ValueError(f"got {len(los)} interval starts but {len(his)} ends")
        total = self.total
        for lo, hi in zip(los, his):
            if not 0 <= lo < hi <= total:
                raise ValueError(f"invalid interval [{lo}, {hi}) for total {total}")
        self._encode_intervals(los, his)

    def _encode_intervals(self, los: List[int], his: List[int]) -> None:
        if self._finished:
            raise RuntimeError("encoder already finished")
        # Hot loop with locals (the validated fast path of encode_batch).
        prec = self.precision
        total = self.total
        low = self._low
        rng = self._range
        shift_low = self._shift_low
        for lo, hi in zip(los, his):
            r = rng >> prec
            low += r * lo
            if hi == total:
                rng -= r * lo
            else:
                rng = r * (hi - lo)
            while rng < _BOT:
                rng <<= 8
                self._low = low
                shift_low()
                low = self._low
        self._low = low
        self._range = rng
        self.num_symbols += len(los)

    def finish(self) -> bytes:
        """Flush and return the compressed bytes (shortest form; may be empty)."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        low, rng = self._low, self._range
        hi_excl = low + rng
        # Pick the value in [low, low + range) with the most trailing zero bits.
        value = low
        for k in range(_STATE_BITS, -1, -1):
            mask = (1 << k) - 1
            v = (low + mask) & ~mask
            if v < hi_excl:
                value = v
                break
        self._low = value
        for _ in range(_STATE_BYTES + 1):
            self._shift_low()
        out = self._out
        # out[0] is the initial cache byte; the code value is < 1 so it is always 0.
        assert out[0] == 0, "range coder invariant violated"
        data = bytes(out[1:]).rstrip(b"\x00")    # decoder pads with zeros
        return data


# --------------------------------------------------------------------------- #
# Decoder
# --------------------------------------------------------------------------- #
class ArithmeticDecoder:
    """Range decoder. Reading past the end of ``data`` yields zero bytes.

    Corrupt or truncated input never hangs or raises an obscure error: it simply
    decodes (wrong) symbols. Invalid cdf rows raise ``ValueError``.
    """

    def __init__(self, data: bytes, precision: int = PRECISION):
        self.precision = _check_precision(precision)
        self.total = 1 << self.precision
        self._data = bytes(data)
        self._pos = 0
        code = 0
        for _ in range(_STATE_BYTES):
            code = (code << 8) | self._next_byte()
        self._code = code
        self._range = _TOP - 1
        self.num_symbols = 0

    def _next_byte(self) -> int:
        pos = self._pos
        self._pos = pos + 1
        if pos < len(self._data):
            return self._data[pos]
        return 0

    def _target(self) -> tuple:
        r = self._range >> self.precision
        value = self._code // r
        if value >= self.total:            # only reachable for corrupt data / last-symbol slack
            value = self.total - 1
        return r, value

    def _consume(self, r: int, lo: int, hi: int) -> None:
        self._code -= r * lo
        if hi == self.total:
            self._range -= r * lo
        else:
            self._range = r * (hi - lo)
        if self._code < 0:                 # only with corrupt data: keep state sane
            self._code &= _CODE_MASK
        while self._range < _BOT:
            self._range <<= 8
            self._code = ((self._code << 8) | self._next_byte()) & _CODE_MASK
        self.num_symbols += 1

    def decode(self, cdf_row) -> int:
        """Decode one symbol under ``cdf_row`` (V+1 ints, last == total)."""
        row = _row(cdf_row)
        n = len(row) - 1
        if n < 1:
            raise ValueError("cdf_row must have at least 2 entries")
        if int(row[n]) != self.total:
            raise ValueError(f"cdf_row total {int(row[n])} != 2**precision = {self.total}")
        r, value = self._target()
        if isinstance(row, np.ndarray):
            s = int(np.searchsorted(row, value, side="right")) - 1
        else:
            s = bisect_right(row, value) - 1
        if s < 0:
            s = 0
        elif s >= n:
            s = n - 1
        lo = int(row[s])
        hi = int(row[s + 1])
        if not 0 <= lo < hi <= self.total:
            raise ValueError(f"invalid cdf_row: symbol {s} has interval [{lo}, {hi})")
        self._consume(r, lo, hi)
        return s


# --------------------------------------------------------------------------- #
# Convenience
# --------------------------------------------------------------------------- #
def _gather_intervals(symbols, cdf_rows, total: int):
    """Return python lists (lo, hi) for each symbol, validated."""
    if isinstance(symbols, torch.Tensor):
        sym = symbols.detach().to("cpu").reshape(-1).numpy()
    else:
        sym = np.asarray(list(symbols) if not isinstance(symbols, np.ndarray) else symbols)
        sym = sym.reshape(-1)
    n = sym.shape[0]
    if n and sym.dtype.kind not in "iu":
        raise ValueError(f"symbols must be integers, got dtype {sym.dtype}")
    sym = sym.astype(np.int64, copy=False)

    if isinstance(cdf_rows, torch.Tensor) or isinstance(cdf_rows, np.ndarray):
        cdf = cdf_rows.detach().to("cpu").numpy() if isinstance(cdf_rows, torch.Tensor) else cdf_rows
        if cdf.ndim != 2:
            raise ValueError(f"cdf_rows must have shape (N, V+1), got {tuple(cdf.shape)}")
        if cdf.shape[0] != n:
            raise ValueError(f"got {n} symbols but {cdf.shape[0]} cdf rows")
        if n == 0:
            return [], []
        if cdf.dtype.kind not in "iu":
            raise ValueError(f"cdf_rows must hold integers, got dtype {cdf.dtype}")
        vocab = cdf.shape[1] - 1
        if ((sym < 0) | (sym >= vocab)).any():
            bad = int(sym[(sym < 0) | (sym >= vocab)][0])
            raise ValueError(f"symbol {bad} out of range for alphabet of size {vocab}")
        if (cdf[:, -1] != total).any():
            raise ValueError(f"cdf rows must end with 2**precision = {total}")
        idx = np.arange(n)
        lo = cdf[idx, sym].astype(np.int64)
        hi = cdf[idx, sym + 1].astype(np.int64)
        if ((lo < 0) | (hi <= lo) | (hi > total)).any():
            raise ValueError("a coded symbol has zero frequency or the cdf is invalid")
        return lo.tolist(), hi.tolist()

    rows = list(cdf_rows)
    if len(rows) != n:
        raise ValueError(f"got {n} symbols but {len(rows)} cdf rows")
    los, his = [], []
    for s, row in zip(sym.tolist(), rows):
        row = _row(row)
        v = len(row) - 1
        if not 0 <= s < v:
            raise ValueError(f"symbol {s} out of range for alphabet of size {v}")
        if int(row[v]) != total:
            raise ValueError(f"cdf row total {int(row[v])} != 2**precision = {total}")
        lo, hi = int(row[s]), int(row[s + 1])
        if not 0 <= lo < hi <= total:
            raise ValueError(f"symbol {s} has zero frequency or the cdf is invalid")
        los.append(lo)
        his.append(hi)
    return los, his


def encode_sequence(symbols, cdf_rows, precision: int = PRECISION) -> bytes:
    """Encode ``symbols`` (N ints) with ``cdf_rows`` ((N, V+1) tensor/array or N rows)."""
    enc = ArithmeticEncoder(precision)
    enc.encode_batch(symbols, cdf_rows)
    return enc.finish()


def decode_sequence(
    data: bytes,
    num_symbols: int,
    cdf_fn: Callable[[int, List[int]], Sequence[int]],
    precision: int = PRECISION,
) -> List[int]:
    """Decode ``num_symbols`` symbols; ``cdf_fn(i, prefix)`` returns the cdf row of step ``i``.

    ``prefix`` is the list of the ``i`` symbols decoded so far (a live list that
    grows after the call returns; copy it if you need to keep it).
    """
    num_symbols = int(num_symbols)
    if num_symbols < 0:
        raise ValueError("num_symbols must be >= 0")
    dec = ArithmeticDecoder(data, precision)
    out: List[int] = []
    for i in range(num_symbols):
        out.append(dec.decode(cdf_fn(i, out)))
    return out


def ideal_bits(symbols, cdf_rows, precision: int = PRECISION) -> float:
    """``-sum log2(freq / total)`` of ``symbols`` under the quantised model."""
    total = 1 << _check_precision(precision)
    los, his = _gather_intervals(symbols, cdf_rows, total)
    if not los:
        return 0.0
    freq = np.asarray(his, dtype=np.float64) - np.asarray(los, dtype=np.float64)
    return float(-(np.log2(freq) - math.log2(total)).sum())
