"""Offline unblinding (Slalom's preprocessing): masks and their unblinding factors made ahead of time.

A mask ``r = s * z`` hides a tensor the enclave sends to the REE; removing it from the REE's answer
needs the unblinding factor ``s * (z W^T)`` (``linear``) or ``s * (z W)`` (``linear_t``). ``z`` does
not depend on the data (only the scalar ``s`` does), so :class:`MaskPool` draws ``z`` and multiplies
it by the frozen weights before the step, and the step itself only scales, adds and subtracts.

A linear map acts on each row (token) of its input on its own, so the pool holds **rows**: per
*site* (the layers that read one masked tensor: ``linear`` of q, k and v together, or
``linear_t`` of one layer) a float64 block ``z`` of shape ``(rows, C_in)`` and, for each layer of
the site, its factor block ``(rows, C_out)``. A tensor of ``N`` rows takes the site's next ``N``
rows. Every row is handed out once: :meth:`MaskPool.take` moves the site's cursor past the rows
before returning them and drops them from the pool, and a taken range below the cursor raises
:class:`~silotune.errors.MaskReuseError`. The rows themselves come from
:class:`~silotune.adapter_tee.masked_stream.MaskStream`, which never hands out a keystream block
twice, so no two rows of any site share randomness either.

Check vectors for Freivalds' test are precomputed the same way: per layer and direction a fresh
secret ``v`` and ``W^T v`` (or ``W v``), one pair per answer, never reused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from silotune.adapter_tee.masked_stream import MaskStream
from silotune.errors import MaskReuseError

__all__ = ["LINEAR", "LINEAR_T", "MaskPool", "PoolStats", "PooledMask"]

LINEAR = "linear"  # REE computes (x + r) W^T
LINEAR_T = "linear_t"  # REE computes (g + r) W
CHECKS_PER_FILL = 2  # Freivalds pairs kept per layer and direction (a step uses one)

WeightOf = Callable[[str], torch.Tensor]
"""Layer name -> its frozen float64 weight ``(C_out, C_in)``, as the enclave holds it."""


@dataclass
class PoolStats:
    """What preprocessing cost since the last :meth:`MaskPool.take_stats`.

    ``preprocess_s`` is all of it; ``inline_s`` the part done inside a call because a site ran
    short (the rest ran in :meth:`MaskPool.fill`, between steps). ``peak_bytes`` is the pool's
    largest size in that time.
    """

    preprocess_s: float = 0.0
    inline_s: float = 0.0
    rows_drawn: int = 0
    rows_used: int = 0
    refills: int = 0
    peak_bytes: int = 0

    def as_dict(self) -> dict[str, float]:
        return {
            "preprocess_s": self.preprocess_s,
            "inline_preprocess_s": self.inline_s,
            "pool_rows_drawn": self.rows_drawn,
            "pool_rows_used": self.rows_used,
            "pool_refills": self.refills,
            "pool_peak_bytes": self.peak_bytes,
        }


@dataclass(frozen=True)
class PooledMask:
    """Rows ``[first_row, first_row + n)`` of one site: ``z`` and each layer's factor for it."""

    site: tuple[str, str]
    first_row: int
    z: torch.Tensor  # (n, C_in) float64, standard normal
    factors: dict[str, torch.Tensor]  # layer -> (n, C_out) float64: z W^T, or z W for linear_t


@dataclass
class _Site:
    """One site's unused rows; ``served`` counts the rows handed out since the start."""

    method: str
    names: list[str]
    z: torch.Tensor
    factors: dict[str, torch.Tensor]
    served: int = 0

    @property
    def rows(self) -> int:
        return int(self.z.shape[0])

    def nbytes(self) -> int:
        # The storage, not the view: rows already served stay allocated until the next refill.
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [self.z, *self.factors.values()]
        }
        return sum(storages.values())


@dataclass
class MaskPool:
    """Precomputed one-time masks and unblinding factors, per site, each row handed out once.

    Parameters
    ----------
    masks
        The enclave's mask stream (all randomness comes from it).
    weight_of
        The frozen float64 weight of a layer by name.
    rows
        How many unused rows :meth:`fill` keeps per site.
    """

    masks: MaskStream
    weight_of: WeightOf
    rows: int
    stats: PoolStats = field(default_factory=PoolStats)
    _sites: dict[tuple[str, str], _Site] = field(default_factory=dict)
    _checks: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = field(
        default_factory=dict
    )

    def __post_init__(self) -> None:
        if self.rows <= 0:
            raise ValueError(f"a mask pool needs rows > 0, got {self.rows}")

    def take_stats(self) -> PoolStats:
        """Return the counters gathered so far and start new ones."""
        stats, self.stats = self.stats, PoolStats(peak_bytes=self.nbytes())
        return stats

    def nbytes(self) -> int:
        """Bytes the pool holds now (masks, factors and check vectors, all float64)."""
        checks = sum(
            v.numel() * v.element_size() + u.numel() * u.element_size()
            for pairs in self._checks.values()
            for v, u in pairs
        )
        return sum(site.nbytes() for site in self._sites.values()) + checks

    def sites(self) -> list[tuple[str, str]]:
        """The sites seen so far, as ``(method, leading layer)``."""
        return list(self._sites)

    def served(self, method: str, leader: str) -> int:
        """How many rows of a site have been handed out (its cursor)."""
        site = self._sites.get((method, leader))
        return site.served if site is not None else 0

    def join(self, method: str, leader: str, name: str) -> None:
        """Layer ``name`` reads the same masked tensor as ``leader``: give the site its factors.

        They are computed at the next :meth:`fill`, before the rows are handed out.
        """
        site = self._sites.get((method, leader))
        if site is not None and name not in site.names:
            site.names.append(name)

    def fill(self, rows: int | None = None) -> None:
        """Top every known site up to ``rows`` unused rows (default: the pool's size); offline."""
        start = time.perf_counter()
        want = self.rows if rows is None else rows
        for site in self._sites.values():
            self._grow(site, site.names, want)
        for key in self._checks:
            self._top_up_checks(key, CHECKS_PER_FILL)
        self._account(time.perf_counter() - start, inline=False)

    def take(self, method: str, names: list[str], n: int) -> PooledMask:
        """Hand out the next ``n`` rows of the site ``(method, names[0])``, with every layer's factor.

        A site not seen before, one with too few rows, or one asked for a layer whose factors it
        does not hold yet is refilled here first (counted as inline preprocessing).
        """
        if method not in (LINEAR, LINEAR_T) or not names or n < 0:
            raise ValueError(f"take({method!r}, {names!r}, {n}): bad site or row count")
        key = (method, names[0])
        site = self._sites.get(key)
        if site is None or site.rows < n or any(name not in site.factors for name in names):
            start = time.perf_counter()
            if site is None:
                site = self._new_site(method, names)
                self._sites[key] = site
            self._grow(site, names, max(self.rows, n))
            self.stats.refills += 1
            self._account(time.perf_counter() - start, inline=True)
        return self._serve(site, site.served, n, names)

    def _serve(self, site: _Site, first: int, n: int, names: list[str]) -> PooledMask:
        """Rows ``[first, first + n)`` of ``site``, which must start at its cursor."""
        if first != site.served:
            raise MaskReuseError(
                f"mask rows from {first} of site {site.names[0]} ({site.method}) asked for, but "
                f"the site's cursor is at {site.served}; a precomputed mask is used once"
            )
        # Move the cursor and drop the rows from the pool before anyone uses them.
        site.served += n
        z, site.z = site.z[:n], site.z[n:]
        factors = {}
        for name in site.factors:
            block = site.factors[name]
            factors[name], site.factors[name] = block[:n], block[n:]
        if site.rows == 0:  # let the served blocks go once their users are done with them
            site.z = site.z.new_empty((0, site.z.shape[1]))
            site.factors = {k: f.new_empty((0, f.shape[1])) for k, f in site.factors.items()}
        self.stats.rows_used += n
        return PooledMask((site.method, site.names[0]), first, z, {k: factors[k] for k in names})

    def check_pair(self, method: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh secret Freivalds pair ``(v, W^T v)`` (``linear``) or ``(v, W v)``, used once."""
        key = (method, name)
        pairs = self._checks.setdefault(key, [])
        if not pairs:
            start = time.perf_counter()
            self._top_up_checks(key, CHECKS_PER_FILL)
            self.stats.refills += 1
            self._account(time.perf_counter() - start, inline=True)
        return pairs.pop(0)

    def _new_site(self, method: str, names: list[str]) -> _Site:
        weight = self.weight_of(names[0])
        width = weight.shape[1] if method == LINEAR else weight.shape[0]
        empty = torch.empty((0, width), dtype=weight.dtype)
        return _Site(method, list(names), empty, {})

    def _grow(self, site: _Site, names: list[str], want: int) -> None:
        """Give ``site`` factors for every layer of ``names`` and at least ``want`` unused rows."""
        for name in names:
            if name not in site.names:
                site.names.append(name)
        for name in site.names:  # rows drawn before this layer joined the site
            if name not in site.factors:
                site.factors[name] = self._factor(site.method, name, site.z)
        extra = want - site.rows
        if extra > 0:
            z = self.masks.gaussian((extra, site.z.shape[1])).z
            fresh = {name: self._factor(site.method, name, z) for name in site.names}
            if site.rows == 0:  # the usual case: a step used up the rows drawn for it
                site.z, site.factors = z, fresh
            else:
                site.z = torch.cat((site.z, z))
                site.factors = {k: torch.cat((site.factors[k], f)) for k, f in fresh.items()}
            self.stats.rows_drawn += extra

    def _factor(self, method: str, name: str, z: torch.Tensor) -> torch.Tensor:
        weight = self.weight_of(name)
        return torch.nn.functional.linear(z, weight) if method == LINEAR else z @ weight

    def _top_up_checks(self, key: tuple[str, str], count: int) -> None:
        method, name = key
        weight = self.weight_of(name)
        out_dim = weight.shape[0] if method == LINEAR else weight.shape[1]
        pairs = self._checks[key]
        while len(pairs) < count:
            v = self.masks.gaussian((out_dim,)).z
            pairs.append((v, v @ weight if method == LINEAR else weight @ v))

    def _account(self, seconds: float, inline: bool) -> None:
        self.stats.preprocess_s += seconds
        if inline:
            self.stats.inline_s += seconds
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.nbytes())
