"""Initial values for newly created entries (docs/semantics.md §5.2).

An initializer runs only when an entry is created (assign, assign_add, optimize or
reinitialize on a missing id); lookups of missing ids return zeros and never call it.
Each initializer fills one segment: :meth:`Initializer.init` returns ``float32[n, dim]``
for ``n`` new entries at once.
"""

from __future__ import annotations

import abc

import numpy as np

from protos import initializer_config_pb2 as icfg
from ps_server.engine.types import Floats
from ps_server.errors import ConfigError

#: Seed of Monolith's thread-local ``std::mt19937`` when nobody seeds it.
DEFAULT_SEED = 5489


class Initializer(abc.ABC):
    """Produces the starting values of one segment.

    :param dim: the segment's width (elements per entry).
    :raises ConfigError: if ``dim`` is negative.
    """

    def __init__(self, dim: int) -> None:
        if dim < 0:
            raise ConfigError(f"initializer dim_size must be >= 0, got {dim}")
        self.dim = dim

    @abc.abstractmethod
    def init(self, n: int) -> Floats:
        """Values for ``n`` new entries: a fresh ``float32[n, dim]`` array."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim})"


class ConstantsInitializer(Initializer):
    """Every element starts at ``constant`` (rounded to float32)."""

    def __init__(self, dim: int, constant: float) -> None:
        super().__init__(dim)
        self.constant = np.float32(constant)

    def init(self, n: int) -> Floats:
        return np.full((n, self.dim), self.constant, dtype=np.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, constant={float(self.constant)!r})"


class ZerosInitializer(ConstantsInitializer):
    """Every element starts at 0.0."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 0.0)


class OnesInitializer(ConstantsInitializer):
    """Every element starts at 1.0."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 1.0)


class RandomUniformInitializer(Initializer):
    """Uniform float32 values in ``[minval, maxval)``.

    Values are ``u * (maxval - minval) + minval`` in float32 with ``u`` uniform in
    ``[0, 1)``, as Monolith computes them; results that round up to ``maxval`` are
    moved to the float32 just below it so the interval stays half-open. The random
    stream is a seeded :class:`numpy.random.Generator` (PCG64): reproducible for a
    given seed and call sequence, but **not** Monolith's ``std::mt19937`` sequence
    (docs/semantics.md §5.2 does not make that sequence part of the contract).

    :param dim: the segment's width.
    :param minval: lower bound (inclusive).
    :param maxval: upper bound (exclusive when ``maxval > minval``).
    :param seed: generator seed; defaults to Monolith's default 5489.
    """

    def __init__(
        self, dim: int, minval: float = -0.05, maxval: float = 0.05, seed: int = DEFAULT_SEED
    ) -> None:
        super().__init__(dim)
        self.minval = np.float32(minval)
        self.maxval = np.float32(maxval)
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def init(self, n: int) -> Floats:
        u = self._rng.random((n, self.dim), dtype=np.float32)
        out = u * (self.maxval - self.minval) + self.minval
        if self.maxval > self.minval:
            below = np.nextafter(self.maxval, np.float32(-np.inf), dtype=np.float32)
            np.minimum(out, below, out=out)
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, minval={float(self.minval)!r}, "
            f"maxval={float(self.maxval)!r}, seed={self.seed})"
        )


def initializer_from_config(
    config: icfg.InitializerConfig, dim: int, seed: int | None = None
) -> Initializer:
    """Build the initializer a segment's ``init_config`` selects.

    :param config: an ``InitializerConfig`` with one member of its ``type`` oneof set.
    :param dim: the segment's ``dim_size``; it overrides the sub-config's ``dim_size``.
    :param seed: seed for ``random_uniform`` (``None`` → :data:`DEFAULT_SEED`); ignored
        by the deterministic initializers.
    :raises ConfigError: no oneof member is set, or ``dim`` is negative.
    """
    kind = config.WhichOneof("type")
    if kind == "zeros":
        return ZerosInitializer(dim)
    if kind == "ones":
        return OnesInitializer(dim)
    if kind == "constants":
        return ConstantsInitializer(dim, config.constants.constant)
    if kind == "random_uniform":
        ru = config.random_uniform
        return RandomUniformInitializer(
            dim, ru.minval, ru.maxval, DEFAULT_SEED if seed is None else seed
        )
    raise ConfigError(
        "init_config has no initializer selected: set one of zeros, ones, constants or "
        "random_uniform (e.g. InitializerConfig(zeros=ZerosInitializerConfig()))"
    )
