"""The live silos of a split job and the rendezvous points among them.

Each silo holds one *seat*: its authenticated session (one thread on the coordinator). A seat
leaves the roster when its session ends, when its connection is found closed while others wait
for it (a silo killed at a sync point does not hang the job), or when the same enrolled silo
joins again: the new session, already authenticated by the handshake and agreed on the job's
settings, replaces the old one, whose connection is closed. A replaced (stale) seat can no longer
contribute to a rendezvous, so an old session cannot act in its silo's name.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from silotune.errors import SplitError

__all__ = ["POLL_S", "Roster", "Seat"]

log = logging.getLogger(__name__)

POLL_S = 0.2  # seconds between checks for silos whose connection closed while others wait


@dataclass(eq=False)
class Seat:
    """One session of a silo in the roster (compared by identity: a re-join is a new seat)."""

    name: str
    examples: int
    connection: Any = None  # the session's connection; ``closed`` tells a dead silo

    def closed(self) -> bool:
        """Whether the session's connection is gone (closed by either side)."""
        return bool(getattr(self.connection, "closed", False))

    def close(self) -> None:
        """Close the session's connection; never raises (it may be gone already)."""
        if self.connection is not None:
            try:
                self.connection.close()
            except Exception:  # noqa: BLE001 - best effort on a dead or replaced session
                log.debug("Closing the replaced session of silo %s failed.", self.name)


class Roster:
    """The live silos and rendezvous points among them (one contribution per live silo).

    Parameters
    ----------
    timeout
        Seconds a silo waits at a rendezvous for the others before giving up.
    """

    def __init__(self, timeout: float) -> None:
        self.cond = threading.Condition()
        self.timeout = timeout
        self.examples: dict[str, int] = {}  # live silo -> training examples
        self.seats: dict[str, Seat] = {}  # live silo -> its current session
        self.ever: set[str] = set()  # silos that joined at least once
        self._local = threading.local()  # the seat of the session thread calling
        self._rounds: dict[str, int] = {}
        self._pending: dict[tuple[str, int], dict[str, Any]] = {}
        self._results: dict[tuple[str, int], dict[str, Any]] = {}
        self._combines: dict[tuple[str, int], tuple[Callable[..., Any], Any]] = {}

    @property
    def live(self) -> set[str]:
        """Names of the silos in session now."""
        return set(self.examples)

    @property
    def joined(self) -> int:
        """Distinct silos that joined so far (a re-join does not count twice)."""
        return len(self.ever)

    def join(self, name: str, examples: int, connection: Any = None) -> Seat | None:
        """Seat the calling thread's session of silo ``name``; return the seat it replaced.

        Call it only after the session is authenticated (enrolled identity, agreed settings):
        an older session of the same silo is removed and its connection closed.
        """
        seat = Seat(name, examples, connection)
        with self.cond:
            old = self.seats.get(name)
            if old is not None:
                log.warning("Silo %s joined again; its previous session is replaced.", name)
                self._remove(name)
            self.seats[name], self.examples[name] = seat, examples
            self.ever.add(name)
            self._local.seat = seat
            self._try_complete_all()
            self.cond.notify_all()
        if old is not None:
            old.close()
        return old

    def holds(self, name: str) -> bool:
        """Whether the calling thread's session is still ``name``'s seat (not replaced or gone)."""
        seat = getattr(self._local, "seat", None)
        with self.cond:
            current = self.seats.get(name)
            return current is not None and (seat is None or current is seat)

    def leave(self, name: str) -> bool:
        """Remove the calling thread's seat of ``name``; False if it was replaced or gone already.

        Rendezvous that waited for it complete without it.
        """
        seat = getattr(self._local, "seat", None)
        with self.cond:
            current = self.seats.get(name)
            if current is None or (seat is not None and current is not seat):
                return False
            self._remove(name)
            self._try_complete_all()
            self.cond.notify_all()
            return True

    def _remove(self, name: str) -> None:
        """Forget a silo's seat and its open contributions (lock held)."""
        self.seats.pop(name, None)
        self.examples.pop(name, None)
        for values in self._pending.values():
            values.pop(name, None)
        for results in self._results.values():
            results.pop(name, None)

    def _reap(self) -> None:
        """Remove silos whose connection closed (lock held): nobody waits for a dead silo."""
        for name, seat in list(self.seats.items()):
            if seat.closed():
                log.warning("Silo %s's connection closed; removed from the roster.", name)
                self._remove(name)
                self._try_complete_all()
                self.cond.notify_all()

    def _check_seat(self, member: str, point: str) -> None:
        """Raise if the calling thread's session of ``member`` is no longer seated (lock held)."""
        seat = getattr(self._local, "seat", None)
        current = self.seats.get(member)
        if current is None or (seat is not None and current is not seat):
            why = "was replaced by a new session" if current is not None else "left"
            raise SplitError(f"silo {member!r} {why} while waiting at {point}")

    def wait_for_quorum(self, count: int) -> None:
        """Block until ``count`` silos have joined (or the timeout passed; then go on)."""
        deadline = time.monotonic() + self.timeout
        with self.cond:
            while self.joined < count and time.monotonic() < deadline:
                self._reap()
                self.cond.wait(min(POLL_S, max(0.0, deadline - time.monotonic())))
            if self.joined < count:
                log.warning(
                    "Only %d of %d silos joined within %.0f s; training with them.",
                    self.joined,
                    count,
                    self.timeout,
                )

    def gather(
        self,
        point: str,
        member: str,
        value: Any,
        combine: Callable[[dict[str, Any]], dict[str, Any]],
        expected: Callable[[], set[str]] | None = None,
    ) -> Any:
        """Contribute ``value`` to the open round of rendezvous ``point`` and wait for its result.

        The round completes when every expected silo (default: the live ones) has contributed or
        left; the thread that completes it runs ``combine(values by silo)``, which returns each
        contributor's result. Rounds of one point are numbered, so a fast silo's next
        contribution goes to the next round. A silo whose connection closes while the others
        wait for it leaves the roster, so the round completes without it.
        """
        deadline = time.monotonic() + self.timeout
        with self.cond:
            self._check_seat(member, point)  # a replaced session contributes nothing
            key = (point, self._rounds.get(point, 0))
            self._pending.setdefault(key, {})[member] = value
            self._combines[key] = (combine, expected)
            self._try_complete(key)
            while key not in self._results or member not in self._results[key]:
                self._check_seat(member, point)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    waiting = sorted(self._expected(key) - set(self._pending.get(key, {})))
                    raise SplitError(
                        f"timed out after {self.timeout:.0f} s at {point} waiting for {waiting}"
                    )
                self._reap()
                if key in self._results and member in self._results[key]:
                    break
                self.cond.wait(min(POLL_S, remaining))
            results = self._results[key]
            result = results.pop(member)
            if isinstance(result, BaseException):
                raise result
            if not results:
                del self._results[key]
            return result

    def _expected(self, key: tuple[str, int]) -> set[str]:
        _, expected = self._combines[key]
        return (expected() if expected is not None else set(self.examples)) & set(self.examples)

    def _try_complete_all(self) -> None:
        for key in list(self._pending):
            self._try_complete(key)

    def _try_complete(self, key: tuple[str, int]) -> None:
        """Run the round's combine if every expected live silo has contributed (lock held)."""
        values = self._pending.get(key)
        if values is None or not self._expected(key) <= set(values):
            return
        combine, _ = self._combines.pop(key)
        del self._pending[key]
        point = key[0]
        self._rounds[point] = key[1] + 1
        live = {name: v for name, v in values.items() if name in self.examples}
        try:
            results: dict[str, Any] = combine(live) if live else {}
        except Exception as exc:  # every contributor sees the failure
            log.exception("The trunk failed at %s.", point)
            error = SplitError(f"the trunk failed at {point}: {exc}")
            results = dict.fromkeys(live, error)
        self._results[key] = results
        self.cond.notify_all()
