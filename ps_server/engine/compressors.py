"""Float compressors (SERVING storage) and retrievers (TRAINING view): docs/semantics.md §5.3.

A segment's ``comp_config`` means two different things depending on the entry type:

* **TRAINING** tables store float32 and use the config only to pick a
  :class:`Retriever`: the view lookups return (:meth:`Retriever.forward`) and the
  transform applied to gradients before the optimizer (:meth:`Retriever.backward`).
* **SERVING** tables store the :class:`Compressor` encoding; a lookup returns
  :meth:`Compressor.decode` of it, so what a SERVING table hands back for a written
  value is :meth:`Compressor.roundtrip`.

Everything works on whole arrays (any shape, typically ``[m, dim]``) in float32.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from protos import float_compressor_pb2 as fcfg
from ps_server.engine.fpmath import fma32, powf_half, tanhf
from ps_server.engine.types import Floats
from ps_server.errors import ConfigError

# ----------------------------------------------------------------------------- compressors


class Compressor(abc.ABC):
    """The storage encoding of one SERVING segment.

    ``encode`` maps float32 values to the stored array (same shape, dtype
    :attr:`storage_dtype`); ``decode`` maps it back to float32.
    """

    #: bytes one value takes once encoded.
    bytes_per_value: ClassVar[int]
    #: dtype of :meth:`encode`'s result.
    storage_dtype: ClassVar[np.dtype[Any]]

    def __init__(self, dim: int) -> None:
        self.dim = dim

    @abc.abstractmethod
    def encode(self, values: npt.ArrayLike) -> npt.NDArray[Any]:
        """Encode float32 ``values`` (any shape) into a new array of the same shape."""

    @abc.abstractmethod
    def decode(self, encoded: npt.NDArray[Any]) -> Floats:
        """Decode an array produced by :meth:`encode` into a new float32 array."""

    def roundtrip(self, values: npt.ArrayLike) -> Floats:
        """``decode(encode(values))``: what a SERVING table keeps for ``values``."""
        return self.decode(self.encode(values))


class Fp32Compressor(Compressor):
    """Identity: values are stored as float32 (4 bytes)."""

    bytes_per_value = 4
    storage_dtype = np.dtype(np.float32)

    def encode(self, values: npt.ArrayLike) -> Floats:
        return np.array(values, dtype=np.float32, copy=True)

    def decode(self, encoded: npt.NDArray[Any]) -> Floats:
        return np.array(encoded, dtype=np.float32, copy=True)


class Fp16Compressor(Compressor):
    """IEEE half precision (2 bytes): round-to-nearest-even, overflow becomes ±inf.

    As Monolith's half.hpp (v2.1.0, default rounding): that is numpy's float16 cast,
    except for NaNs, which half.hpp always makes quiet — sign, ``0x7E00`` and the top
    10 payload bits (``(bits >> 13) & 0x3FF``) — where numpy keeps a signalling NaN
    signalling (e.g. float ``0x7F800001``: half.hpp ``0x7E00``, numpy ``0x7C01``).
    """

    bytes_per_value = 2
    storage_dtype = np.dtype(np.float16)

    def encode(self, values: npt.ArrayLike) -> npt.NDArray[np.float16]:
        f = np.asarray(values, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            out = f.astype(np.float16)
        nan = np.isnan(f)
        if nan.any():
            fb = f[nan].view(np.uint32)
            half_bits = (((fb >> 16) & 0x8000) | 0x7E00 | ((fb >> 13) & 0x3FF)).astype(np.uint16)
            out[nan] = half_bits.view(np.float16)
        return out

    def decode(self, encoded: npt.NDArray[Any]) -> Floats:
        return np.asarray(encoded, dtype=np.float16).astype(np.float32)


class FixedR8Compressor(Compressor):
    """Fixed-range int8 (1 byte): 256 levels of ``r / 128`` covering ``[-r, r)``.

    Encoding rounds half away from zero to the nearest level (``q = trunc((f ± step/2)
    / step)``) and clamps ``q`` to ``[-128, 127]``; NaN encodes 0 and, as Monolith's
    ``(int)`` cast on x86 (INT_MIN), ±inf and ``|f| >= 2^31 * step`` encode -128. Decoding is
    ``q * step``.

    :param r: the range; must be finite and > 0.
    :raises ConfigError: for a bad ``r``.
    """

    bytes_per_value = 1
    storage_dtype = np.dtype(np.int8)

    def __init__(self, dim: int, r: float = 1.0) -> None:
        super().__init__(dim)
        if not (np.isfinite(r) and r > 0):
            raise ConfigError(f"fixed_r8 range r must be a finite number > 0, got {r}")
        self.r = np.float32(r)
        self.step = self.r / np.float32(128)
        self.half_step = self.step / np.float32(2)

    def encode(self, values: npt.ArrayLike) -> npt.NDArray[np.int8]:
        f = np.array(values, dtype=np.float32, copy=True)
        np.copyto(f, np.float32(0), where=np.isnan(f))
        f += np.where(f >= 0, self.half_step, -self.half_step)
        with np.errstate(over="ignore", invalid="ignore"):
            q = np.trunc(f / self.step)
            # Monolith's (int) cast: x86 cvttss2si gives INT_MIN out of int range, so
            # those encode -128 (+inf and 1e10 too). NaN encodes 0, as in Monolith.
            wild = ~(np.abs(q) < np.float32(2.0**31))
        q[wild] = -128
        np.clip(q, -128, 127, out=q)
        return q.astype(np.int8)

    def decode(self, encoded: npt.NDArray[Any]) -> Floats:
        return np.asarray(encoded, dtype=np.int8).astype(np.float32) * self.step


class OneBitCompressor(Compressor):
    """Sign bit (stored as int8 ±1, 1 byte) scaled by ``amplitude`` on decode.

    Encodes ``+1`` where ``amplitude * tanh(init_scale * w) > 0``, else ``-1`` (so 0
    and NaN become ``-1``); decodes ``q * amplitude``.
    """

    bytes_per_value = 1
    storage_dtype = np.dtype(np.int8)

    def __init__(self, dim: int, amplitude: float = 0.1, init_scale: float = 1.0) -> None:
        super().__init__(dim)
        self.amplitude = np.float32(amplitude)
        self.init_scale = np.float32(init_scale)

    def encode(self, values: npt.ArrayLike) -> npt.NDArray[np.int8]:
        w = np.asarray(values, dtype=np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            positive = self.amplitude * tanhf(self.init_scale * w) > 0
        return np.where(positive, np.int8(1), np.int8(-1))

    def decode(self, encoded: npt.NDArray[Any]) -> Floats:
        return np.asarray(encoded, dtype=np.int8).astype(np.float32) * self.amplitude


def compressor_from_config(config: fcfg.FloatCompressorConfig, dim: int) -> Compressor:
    """Build the SERVING compressor a segment's ``comp_config`` selects.

    :param config: a ``FloatCompressorConfig`` with one member of its ``type`` oneof set.
    :param dim: the segment's ``dim_size`` (overrides the sub-config's).
    :raises ConfigError: no oneof member set, or invalid parameters.
    """
    kind = config.WhichOneof("type")
    if kind == "fp32":
        return Fp32Compressor(dim)
    if kind == "fp16":
        return Fp16Compressor(dim)
    if kind == "fixed_r8":
        return FixedR8Compressor(dim, config.fixed_r8.r)
    if kind == "one_bit":
        ob = config.one_bit
        return OneBitCompressor(dim, ob.amplitude, ob.init_scale)
    raise ConfigError(
        "comp_config has no compressor selected: a SERVING segment needs one of fp32, fp16, "
        "fixed_r8 or one_bit (e.g. FloatCompressorConfig(fp16=FloatCompressorConfig.Fp16()))"
    )


# ------------------------------------------------------------------------------ retrievers


class Retriever(abc.ABC):
    """The lookup view of one TRAINING segment and its gradient transform.

    :meth:`forward` gives what lookup returns for stored values; :meth:`backward`
    gives the gradient handed to the optimizer. Both take ``float32[m, dim]`` and
    return ``float32[m, dim]``; neither modifies its inputs in place (``forward`` and
    ``backward`` of :class:`RawRetriever` return their input itself).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim

    @abc.abstractmethod
    def forward(self, params: Floats) -> Floats:
        """What a lookup returns for the stored values ``params``."""

    @abc.abstractmethod
    def backward(self, params: Floats, grads: Floats, global_step: int) -> Floats:
        """The gradient the optimizer receives for ``grads`` at stored ``params``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim})"


class RawRetriever(Retriever):
    """Lookups see the stored float32 values; gradients pass through (fp32, fp16, unset)."""

    def forward(self, params: Floats) -> Floats:
        return params

    def backward(self, params: Floats, grads: Floats, global_step: int) -> Floats:
        return grads


class FixedR8Retriever(Retriever):
    """Fake quantization: lookups see ``decode(encode(w))`` of fixed_r8; gradients pass."""

    def __init__(self, dim: int, r: float = 1.0) -> None:
        super().__init__(dim)
        self.quantizer = FixedR8Compressor(dim, r)

    def forward(self, params: Floats) -> Floats:
        return self.quantizer.roundtrip(params)

    def backward(self, params: Floats, grads: Floats, global_step: int) -> Floats:
        return grads


class OneBitRetriever(Retriever):
    """HashNet continuation: lookups see ``amplitude * tanhf(scale * w)``.

    ``scale`` starts at ``init_scale`` and is state of this object (shared by every
    entry of the segment). :meth:`backward` first refreshes it when ``global_step`` is
    a multiple of ``step_size`` — ``scale = min(init_scale * powf(fma(0.005,
    global_step, 1), 0.5), max_scale)`` in float32 — then scales the gradient by the
    derivative of the forward map, ``(amplitude * scale) * fma(-y, y, 1)`` with ``y =
    tanhf(scale * w)``.

    Every step is the float32 operation Monolith's compiled code performs: glibc's
    ``tanhf`` (:func:`~ps_server.engine.fpmath.tanhf`), ``powf(x, 0.5f)``
    (:func:`~ps_server.engine.fpmath.powf_half`), and the two multiply-adds g++ fuses
    (``1 + 0.005 * step`` and ``1 - y * y``), docs/semantics.md §5.3.

    :raises ConfigError: ``step_size`` is not positive.
    """

    GAMMA: ClassVar[np.float32] = np.float32(0.005)

    def __init__(
        self,
        dim: int,
        step_size: int = 200,
        init_scale: float = 1.0,
        max_scale: float = 10000.0,
        amplitude: float = 0.1,
    ) -> None:
        super().__init__(dim)
        if step_size <= 0:
            raise ConfigError(f"one_bit step_size must be > 0, got {step_size}")
        self.step_size = int(step_size)
        self.init_scale = np.float32(init_scale)
        self.max_scale = np.float32(max_scale)
        self.amplitude = np.float32(amplitude)
        self.scale = self.init_scale

    def forward(self, params: Floats) -> Floats:
        with np.errstate(over="ignore", invalid="ignore"):
            return self.amplitude * tanhf(self.scale * np.asarray(params, dtype=np.float32))

    def backward(self, params: Floats, grads: Floats, global_step: int) -> Floats:
        if global_step % self.step_size == 0:
            # int64 -> float32 in one rounding, as C's static_cast<float>.
            step = np.asarray(global_step, dtype=np.int64).astype(np.float32)
            base = fma32(self.GAMMA, step, np.float32(1))
            with np.errstate(invalid="ignore", over="ignore"):
                grown = np.float32(self.init_scale * powf_half(base))
            # std::min(grown, max_scale) is (max_scale < grown) ? max_scale : grown, so
            # a NaN (negative steps) stays NaN and a NaN max_scale is never taken.
            self.scale = self.max_scale if self.max_scale < grown else grown
        with np.errstate(over="ignore", invalid="ignore"):
            y = tanhf(self.scale * np.asarray(params, dtype=np.float32))
            factor = (self.amplitude * self.scale) * fma32(-y, y, np.float32(1))
            return np.asarray(grads, dtype=np.float32) * factor

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, step_size={self.step_size}, "
            f"scale={float(self.scale)!r}, max_scale={float(self.max_scale)!r}, "
            f"amplitude={float(self.amplitude)!r})"
        )


def retriever_from_config(config: fcfg.FloatCompressorConfig | None, dim: int) -> Retriever:
    """Pick the TRAINING retriever for a segment's (optional) ``comp_config``.

    ``fixed_r8`` → :class:`FixedR8Retriever`, ``one_bit`` → :class:`OneBitRetriever`,
    anything else (fp32, fp16, no member set, ``None``) → :class:`RawRetriever`.

    :raises ConfigError: invalid ``fixed_r8.r`` or ``one_bit.step_size``.
    """
    kind = None if config is None else config.WhichOneof("type")
    if config is None or kind not in ("fixed_r8", "one_bit"):
        return RawRetriever(dim)
    if kind == "fixed_r8":
        return FixedR8Retriever(dim, config.fixed_r8.r)
    ob = config.one_bit
    return OneBitRetriever(dim, ob.step_size, ob.init_scale, ob.max_scale, ob.amplitude)
