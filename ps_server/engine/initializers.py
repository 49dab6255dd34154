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
from ps_server.engine.fpmath import fma32
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
    """Uniform float32 values in ``[minval, maxval)``, bit for bit as Monolith.

    Monolith draws from a ``std::mt19937`` (default seed 5489) and computes
    ``fma(u, maxval - minval, minval)`` with ``u = float(x) / 2^32`` (libstdc++'s
    ``generate_canonical<float, 24>``: one 32-bit draw ``x``, and a ``u`` that rounds
    to 1 becomes the float32 just below 1). numpy's legacy ``RandomState`` is the
    same MT19937 with the same seeding, so the sequence is Monolith's. In Monolith the
    generator is per thread and shared by every random_uniform initializer; a table
    shares one generator among its segments (:meth:`use_generator`), in segment order.

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
        self._rng = np.random.RandomState(seed)

    def use_generator(self, rng: np.random.RandomState) -> None:
        """Draw from ``rng`` (shared with other initializers) from now on."""
        self._rng = rng

    def init(self, n: int) -> Floats:
        x = self._rng.randint(0, 1 << 32, size=(n, self.dim), dtype=np.uint64)
        u = x.astype(np.float32) * np.float32(2.0**-32)
        np.minimum(u, np.nextafter(np.float32(1), np.float32(0)), out=u)
        out = fma32(u, self.maxval - self.minval, self.minval)
        if self.maxval > self.minval:
            # Kept from docs/semantics.md §5.2 (half-open interval): a result that rounds
            # up to maxval moves just below it. Monolith would return maxval there; no
            # vector reaches that case (it needs an interval a few ulps wide).
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
