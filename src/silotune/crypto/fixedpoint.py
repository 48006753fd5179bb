"""Fixed-point codec: float vectors to modular integers whose sum over all silos never wraps.

Rules
-----
* Every value is first checked to be finite (NaN or infinity raises ``ValueError``), then
  saturated to ``[-clip, clip]`` (values outside are clipped, never wrapped), then rounded to
  the nearest multiple of ``1 / scale``.
* ``scale = max_q / clip`` with ``max_q = (2**(bits-1) - 1) // n_silos``: each encoded value is an
  integer in ``[-max_q, max_q]``, so the sum of up to ``n_silos`` of them stays inside the signed
  range of ``bits`` bits and decoding the modular sum is exact.
* Each value carries a rounding error of at most ``0.5 / scale``; a sum of ``k`` values is within
  ``k * 0.5 / scale`` of the float sum of the clipped inputs (see ``sum_tolerance``).

With the defaults used by masking (``bits=32``, ``clip=1``, ``n_silos=16``) the scale is about
1.3e8 and the tolerance of a 16-term sum is 6e-8. Callers that pre-weight updates by
``n_i / N`` clip the *weighted* value; for ``|x| <= clip`` nothing is clipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["FixedPointCodec"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FixedPointCodec:
    """Encode floats into ``bits``-bit two's-complement integers and decode their sums.

    Parameters
    ----------
    clip : float
        Values are saturated to ``[-clip, clip]``; must be finite and > 0.
    n_silos : int
        Most terms a sum may have without wrapping; 1 <= n_silos <= 2**(bits-2).
    bits : int
        Width of the modular integers, 8 <= bits <= 62 (32 for uint32 masking).
    """

    clip: float = 1.0
    n_silos: int = 16
    bits: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 8 <= self.bits <= 62:
            raise ValueError(f"bits must be an int in [8, 62], got {self.bits!r}.")
        if not isinstance(self.n_silos, int) or not 1 <= self.n_silos <= 1 << (self.bits - 2):
            raise ValueError(
                f"n_silos must be an int in [1, {1 << (self.bits - 2)}], got {self.n_silos!r}."
            )
        if not np.isfinite(self.clip) or self.clip <= 0:
            raise ValueError(f"clip must be a finite number > 0, got {self.clip!r}.")

    @property
    def max_q(self) -> int:
        """Largest magnitude of one encoded value."""
        return ((1 << (self.bits - 1)) - 1) // self.n_silos

    @property
    def scale(self) -> float:
        """Integers per unit: an encoded value is ``round(x * scale)``."""
        return self.max_q / self.clip

    def sum_tolerance(self, n_terms: int | None = None) -> float:
        """Bound on ``|decoded sum - float sum of clipped inputs|`` for ``n_terms`` terms."""
        k = self.n_silos if n_terms is None else n_terms
        return k * 0.5 / self.scale

    def quantize(self, values: ArrayLike) -> NDArray[np.int64]:
        """Clip and round ``values`` to signed integers in ``[-max_q, max_q]`` (int64).

        Parameters
        ----------
        values : numpy.ndarray
            Real values of any shape; flattened.

        Returns
        -------
        numpy.ndarray
            Shape ``(values.size,)``, dtype int64.
        """
        x = np.asarray(values)
        if x.dtype.kind not in "fiu":
            raise TypeError(f"values must be a real numeric array, got dtype {x.dtype}.")
        x = x.reshape(-1).astype(np.float64, copy=False)
        if not np.all(np.isfinite(x)):
            raise ValueError("values must be finite; found NaN or infinity.")
        n_clipped = int(np.count_nonzero(np.abs(x) > self.clip))
        if n_clipped:
            logger.debug("Clipped %d of %d values to +-%s.", n_clipped, x.size, self.clip)
        q = np.rint(np.clip(x, -self.clip, self.clip) * self.scale)
        clipped: NDArray[np.int64] = np.clip(q, -self.max_q, self.max_q).astype(np.int64)
        return clipped

    def encode(self, values: ArrayLike) -> NDArray[np.unsignedinteger[Any]]:
        """Encode values as ``bits``-bit residues (uint32 when ``bits == 32``, else uint64).

        Parameters
        ----------
        values : numpy.ndarray
            Real values of any shape; flattened.

        Returns
        -------
        numpy.ndarray
            The two's-complement residues mod ``2**bits``.
        """
        q = self.quantize(values)
        if self.bits == 32:
            return q.astype(np.int32).view(np.uint32)
        return (q & ((1 << self.bits) - 1)).astype(np.uint64)

    def lift(self, residues: ArrayLike) -> NDArray[np.int64]:
        """Map residues mod ``2**bits`` to their centred signed representatives (int64)."""
        r = np.asarray(residues)
        if r.dtype.kind not in "iu":
            raise TypeError(f"residues must be an integer array, got dtype {r.dtype}.")
        if self.bits == 32 and r.dtype == np.uint32:
            return r.view(np.int32).astype(np.int64)
        half = 1 << (self.bits - 1)
        r = r.astype(np.int64) & ((1 << self.bits) - 1)
        return ((r + half) & ((1 << self.bits) - 1)) - half

    def decode_sum(self, residues: ArrayLike, n_terms: int = 1) -> NDArray[np.float32]:
        """Decode the modular sum of ``n_terms`` encoded vectors back to float32.

        Parameters
        ----------
        residues : numpy.ndarray
            Sum of encoded vectors mod ``2**bits`` (or already-lifted signed integers).
        n_terms : int
            How many vectors were summed; must be in ``[1, n_silos]`` or the sum may have wrapped.

        Returns
        -------
        numpy.ndarray
            Float32 sum, within :meth:`sum_tolerance` of the float sum of the clipped inputs.
        """
        if not isinstance(n_terms, int) or not 1 <= n_terms <= self.n_silos:
            raise ValueError(
                f"n_terms must be an int in [1, {self.n_silos}] (the codec's n_silos), "
                f"got {n_terms!r}."
            )
        return (self.lift(residues).astype(np.float64) / self.scale).astype(np.float32)
