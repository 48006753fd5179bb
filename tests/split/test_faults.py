"""Split faults: a silo that dies while the others wait leaves the roster, and an enrolled silo
may join again after a crash, replacing its old session; a stale session can no longer act."""

from __future__ import annotations

import math
import threading
import time

import pytest

from silotune.split.roster import Roster
from silotune.split.session import SplitError
from tests.split.conftest import (
    make_stream,
    open_silo,
    run_threads,
    silo_end,
    split_cfg,
    train_silo,
    trunk_server,
)


class FakeConnection:
    """Just enough of a connection for the roster: a ``closed`` flag and ``close``."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _in_thread(fn):
    box: dict[str, object] = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def _sum(values):
    return dict.fromkeys(values, sum(values.values()))


def test_a_silo_whose_connection_closes_while_others_wait_leaves_the_roster():
    roster = Roster(timeout=30)
    dead = FakeConnection()
    started = time.monotonic()

    def alive():
        roster.join("a", 1, FakeConnection())
        return roster.gather("sync", "a", 1, _sum)

    roster.join("b", 1, dead)
    waiting, box = _in_thread(alive)
    time.sleep(0.3)
    assert waiting.is_alive()  # a waits for b's contribution at the sync point
    dead.closed = True  # b was killed while the others waited for it
    waiting.join(10)
    assert box.get("value") == 1, box  # the round completed without b, well before the timeout
    assert time.monotonic() - started < 5
    assert roster.live == {"a"} and roster.joined == 2


def test_a_rejoin_replaces_the_old_session_which_can_no_longer_contribute():
    roster = Roster(timeout=30)
    old_connection = FakeConnection()
    old_joined, new_joined = threading.Event(), threading.Event()

    def old_session():
        roster.join("a", 1, old_connection)
        old_joined.set()
        new_joined.wait(10)
        return roster.gather("sync", "a", 100, _sum)  # stale: must not count

    def new_session():
        old_joined.wait(10)
        replaced = roster.join("a", 1, FakeConnection())
        new_joined.set()
        assert replaced is not None
        return roster.gather("sync", "a", 1, _sum)

    old_thread, old_box = _in_thread(old_session)
    new_thread, new_box = _in_thread(new_session)
    old_thread.join(10)
    new_thread.join(10)
    assert isinstance(old_box.get("error"), SplitError)
    assert "replaced" in str(old_box["error"])
    assert old_connection.closed  # the old session's connection was closed by the re-join
    assert new_box.get("value") == 1, new_box  # the stale 100 was never added
    assert roster.joined == 1  # one silo, however often it joined


def test_a_replaced_session_cannot_remove_its_successor():
    roster = Roster(timeout=30)
    stale: dict[str, bool] = {}

    def old_session():
        roster.join("a", 1, FakeConnection())
        time.sleep(0.3)
        stale["left"] = roster.leave("a")

    thread, _ = _in_thread(old_session)
    time.sleep(0.1)
    roster.join("a", 2, FakeConnection())
    thread.join(10)
    assert stale == {"left": False} and roster.examples == {"a": 2}


@pytest.mark.parametrize("mode", ["sequential", "client-batching"])
def test_silo_killed_while_waiting_then_rejoined_finishes_the_job(mode, keys_dir, tls_dir):
    """silo-1 joins and dies while waiting for silo-0; it joins again and both train to the end."""
    cfg = split_cfg(train={"max_steps": 2}, silos=2, server_mode=mode, sync_every=1, timeout_s=60)
    steps = cfg.train.max_steps
    with trunk_server(cfg, keys_dir, tls_dir) as (service, connect_fn):
        crashed = silo_end(cfg, open_silo(connect_fn, keys_dir, "silo-1"))
        crashed.session.close()  # killed while waiting at the quorum for silo-0
        started = time.monotonic()
        rejoined = silo_end(cfg, open_silo(connect_fn, keys_dir, "silo-1"))
        stayer = silo_end(cfg, open_silo(connect_fn, keys_dir, "silo-0"))
        results = {}

        def run(name, end, shard):
            stream = make_stream(cfg, end.half, shard)  # loaded here: datasets is not thread-safe
            return lambda: results.setdefault(name, train_silo(end, cfg, stream, steps))

        errors = run_threads(run("silo-0", stayer, 0), run("silo-1", rejoined, 1), timeout=120)
        assert service.finished.wait(10)
    assert errors == [None, None], errors
    assert time.monotonic() - started < 50  # nobody waited out split.timeout_s
    assert all(len(v) == steps and all(map(math.isfinite, v)) for v in results.values())
    outcomes = sorted((r.silo, r.outcome) for r in service.records)
    assert {("silo-0", "finished"), ("silo-1", "finished")} <= set(outcomes), outcomes
    assert {o for s, o in outcomes if s == "silo-1"} <= {"finished", "vanished", "replaced"}


def test_rejoin_while_the_old_session_is_registered_replaces_it(keys_dir, tls_dir):
    """A silo that re-joins while its old session still looks alive takes its seat back."""
    cfg = split_cfg(train={"max_steps": 2}, silos=1, timeout_s=60)
    with trunk_server(cfg, keys_dir, tls_dir) as (service, connect_fn):
        old = silo_end(cfg, open_silo(connect_fn, keys_dir, "silo-0"))
        new = silo_end(cfg, open_silo(connect_fn, keys_dir, "silo-0"))
        losses = train_silo(new, cfg, make_stream(cfg, new.half), 2)
        # The old session is gone: using it gives one clear error, not a hang.
        with pytest.raises(Exception) as failure:
            train_silo(old, cfg, make_stream(cfg, old.half), 1)
        assert "\n" not in str(failure.value)
    assert len(losses) == 2
    record = [(r.silo, r.outcome) for r in service.records]
    assert record == [("silo-0", "replaced"), ("silo-0", "finished")], record
