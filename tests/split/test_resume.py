"""Split ``--resume``: a silo killed after a sync continues from its checkpoint, and a killed
coordinator restarted with ``serve --resume`` continues the trunk from its own."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from silotune.errors import ConfigError
from silotune.split import runner
from silotune.split.keys import load_coordinator_keys
from silotune.train.checkpoint import latest_checkpoint
from silotune.train.run_folder import prepare_output_dir
from silotune.transport.grpc_stream import GrpcStreamServer
from silotune.transport.tls import load_tls_material
from tests.split.conftest import run_threads, split_cfg


class Crash(Exception):
    """Stands for a process killed right after it wrote a checkpoint."""


def _address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def _configs(tmp_path, keys_dir, tls_dir, silos: int):
    common = {"address": _address(), "keys_dir": keys_dir, "tls_dir": tls_dir, "silos": silos}
    train = {"max_steps": 4}
    coordinator = split_cfg(train=train, sync_every=2, timeout_s=60, **common)
    coordinator.output_dir = tmp_path / "coordinator"
    silos_cfg = []
    for i in range(silos):
        cfg = split_cfg(train=train, sync_every=2, timeout_s=60, **common)
        cfg.output_dir = tmp_path / f"silo-{i}"
        silos_cfg.append(cfg)
    return coordinator, silos_cfg


def _wait_for(condition, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _steps(run_dir) -> list[int]:
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["split"] == "train"]


def test_silo_killed_after_a_sync_rejoins_with_resume(keys_dir, tls_dir, tmp_path, monkeypatch):
    coordinator, silos = _configs(tmp_path, keys_dir, tls_dir, silos=2)
    services, crashed = [], threading.Event()
    build, save = runner.build_service, runner.save_silo

    def capture(*args, **kwargs):
        services.append(build(*args, **kwargs))
        return services[-1]

    def save_then_maybe_crash(out_dir, done, *args):
        save(out_dir, done, *args)
        silo = next(a for a in args if isinstance(a, str))
        if silo == "silo-1" and done == 2 and not crashed.is_set():
            crashed.set()
            raise Crash("silo-1 killed after its step-2 checkpoint")
        if silo == "silo-0" and done == 2:  # hold silo-0 until silo-1 is back in the roster
            _wait_for(lambda: len([r for r in services[0].records if r.silo == "silo-1"]) == 2
                      and "silo-1" in services[0].engine.roster.live, "silo-1 to re-join")  # fmt: skip

    monkeypatch.setattr(runner, "build_service", capture)
    monkeypatch.setattr(runner, "save_silo", save_then_maybe_crash)
    results = {}

    def serve():
        results["coordinator"] = runner.serve(coordinator)

    def silo_0():
        _wait_for(lambda: services, "the trunk server")
        results[0] = runner.join(silos[0], "silo-0", shard=0)

    def silo_1():
        _wait_for(lambda: services, "the trunk server")
        with pytest.raises(Crash):
            runner.join(silos[1], "silo-1", shard=1)
        assert latest_checkpoint(silos[1].output_dir).name == "step-00000002"
        results[1] = runner.join(silos[1], "silo-1", shard=1, resume=True)

    errors = run_threads(serve, silo_0, silo_1, timeout=120)
    assert errors == [None, None, None], errors
    assert _steps(silos[1].output_dir) == [1, 2, 3, 4]  # steps 1-2 before the crash, 3-4 after
    outcomes = sorted(s["outcome"] for s in results["coordinator"]["sessions"])
    assert outcomes == ["finished", "finished", "vanished"], outcomes
    # Both silos synced at the last step: they hold the same head/tail adapter and the trunk.
    a = load_file(silos[0].output_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(silos[1].output_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)


def test_coordinator_killed_then_served_with_resume(keys_dir, tls_dir, tmp_path, monkeypatch):
    coordinator, (silo,) = _configs(tmp_path, keys_dir, tls_dir, silos=1)
    stopped = threading.Event()
    save = runner.save_silo

    def save_then_wait(out_dir, done, *args):
        save(out_dir, done, *args)
        if done == 2:  # the coordinator dies before the silo's step 3
            stopped.wait(120)

    monkeypatch.setattr(runner, "save_silo", save_then_wait)
    # The first coordinator: the trunk server `serve` runs, killed after its step-2 checkpoint.
    prepare_output_dir(coordinator, resume=False, overwrite=False)
    identity, enrollment = load_coordinator_keys(keys_dir)
    service = runner.build_service(coordinator, identity, enrollment, checkpoints=True)
    tls = load_tls_material(tls_dir, role="server")
    server = GrpcStreamServer(service.handle, coordinator.split.address, tls=tls)
    server.start()
    outcome = {}

    def first_run():
        try:
            runner.join(silo, "silo-0")
        except Exception as exc:  # noqa: BLE001 - the test reads it
            outcome["error"] = exc

    def kill_coordinator():
        _wait_for(lambda: latest_checkpoint(coordinator.output_dir) is not None, "a checkpoint")
        server.stop(0)
        stopped.set()

    assert run_threads(first_run, kill_coordinator, timeout=300) == [None, None]
    error = str(outcome["error"])
    assert "--resume" in error and "\n" not in error, error  # one line that says what to do
    assert latest_checkpoint(coordinator.output_dir).name == "step-00000002"
    trunk_steps_before = service.commits

    # A changed setting that changes what is computed is refused, naming the key.
    changed = coordinator.model_copy(deep=True)
    changed.train.lr = 0.5
    with pytest.raises(ConfigError, match="train.lr"):
        runner.serve(changed, resume=True)

    results = {}

    def serve_again():
        results["coordinator"] = runner.serve(coordinator, resume=True)

    def rejoin():
        time.sleep(1.0)  # the restarted server binds its port
        results["silo"] = runner.join(silo, "silo-0", resume=True)

    stopped.set()
    assert run_threads(serve_again, rejoin, timeout=300) == [None, None]
    assert trunk_steps_before >= 2
    assert results["coordinator"]["trunk_steps"] == 4  # 2 restored + the silo's steps 3 and 4
    assert _steps(silo.output_dir) == [1, 2, 3, 4]
    trunk = load_file(coordinator.output_dir / "trunk_adapter.safetensors")
    adapter = load_file(silo.output_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(adapter[k], v) for k, v in trunk.items())


def test_cli_documents_resume_and_refuses_it_without_a_checkpoint(
    keys_dir, tls_dir, tmp_path, main_in_process
):
    from typer.testing import CliRunner

    from silotune.cli import app
    from tests.conftest import assert_clean_error

    for command in ("serve", "join"):
        shown = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "--resume" in shown and "checkpoint" in shown, shown
    recipe = tmp_path / "split.yaml"
    recipe.write_text(
        "mode: split\nmodel: tiny-llama\ndata: {dataset: fortunes-sample}\n"
        f"split: {{keys_dir: {keys_dir}, tls_dir: {tls_dir}, address: {_address()}}}\n"
        f"output_dir: {tmp_path / 'silo'}\n"
    )
    result = main_in_process("join", str(recipe), "--silo", "silo-0", "--resume", cwd=tmp_path)
    assert_clean_error(result, "--resume")
    assert "holds no checkpoint" in result.stderr


def test_a_silo_checkpoint_keeps_its_secure_averaging_rounds(tmp_path):
    """A restarted silo still refuses a secure-averaging round it already contributed to."""
    from silotune.split.parts import build_half
    from silotune.split.resume import restore_silo, save_silo
    from silotune.train.loop import make_optimizer, make_scheduler

    cfg = split_cfg()
    half = build_half(cfg, "silo")
    optimizer = make_optimizer(half.model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    save_silo(tmp_path, 2, half.model, optimizer, scheduler, cfg, "silo-0", {"ab12": 3})
    history: dict[str, int] = {}
    step = restore_silo(tmp_path, half.model, optimizer, scheduler, 10, history)
    assert step == 2 and history == {"ab12": 3}
