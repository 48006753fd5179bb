"""Shared fixtures for split-learning tests: keys, TLS, a trunk server and silo ends over it."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from silotune.config import JobConfig, config_from_dict
from silotune.models.presets import tiny_llama_tokenizer
from silotune.split.agreement import shared_settings
from silotune.split.keys import load_coordinator_keys, load_silo_keys, write_job_keys
from silotune.split.parts import ModelHalf, PartState, build_half
from silotune.split.runner import build_service
from silotune.split.session import FrameSession, open_session
from silotune.split.silo import SplitSilo, TrunkLink
from silotune.split.trunk import TrunkService
from silotune.train.loop import make_optimizer, make_scheduler, train_step
from silotune.transport import InProcessServer
from silotune.transport.grpc_stream import GrpcStreamServer, connect
from silotune.transport.tls import generate_tls_material, load_tls_material

SILOS = ["silo-0", "silo-1", "silo-2"]


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Identity keys of a coordinator and three enrolled silos."""
    folder = tmp_path_factory.mktemp("split-keys")
    write_job_keys(folder, SILOS)
    return folder


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server certificate for 127.0.0.1."""
    folder = tmp_path_factory.mktemp("split-tls")
    generate_tls_material(folder, hosts=["127.0.0.1", "localhost"])
    return folder


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 saved as a Hugging Face folder (with tiny-llama's tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = tiny_llama_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=64,
        n_layer=4,
        n_head=4,
        vocab_size=len(tokenizer),
        n_positions=128,
        resid_pdrop=0.0,  # dropout draws differ between processes; parity is without noise
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def split_cfg(
    model: str = "tiny-llama", train: dict[str, Any] | None = None, **split: Any
) -> JobConfig:
    """A small split job on fortunes-sample."""
    train_cfg = {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "eval_every": 1000, "log_every": 1}
    return config_from_dict(
        {
            "mode": "split",
            "model": model,
            "data": {"dataset": "fortunes-sample", "max_length": 64},
            "train": {**train_cfg, **(train or {})},
            "split": {
                "silos": 1,
                "timeout_s": 60,
                **{k: str(v) if isinstance(v, Path) else v for k, v in split.items()},
            },
        }
    )


_SETTINGS: dict[str, dict[str, Any]] = {}


def settings_of(cfg: JobConfig) -> dict[str, Any]:
    """The split settings a silo of ``cfg`` joins with (its half built once per config)."""
    key = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    if key not in _SETTINGS:
        _SETTINGS[key] = shared_settings(cfg, build_half(cfg, "silo").model)
    return _SETTINGS[key]


@dataclass
class SiloEnd:
    """A silo connected to a trunk: its model module, optimizer, scheduler, adapter names."""

    half: ModelHalf
    model: SplitSilo
    link: TrunkLink
    session: FrameSession
    optimizer: torch.optim.Optimizer
    scheduler: Any
    names: PartState

    def adapter(self) -> dict[str, torch.Tensor]:
        """The silo's head and tail adapter tensors."""
        return self.names.get([self.half.parts.head, self.half.parts.tail])


def silo_end(cfg: JobConfig, session: FrameSession, examples: int = 100) -> SiloEnd:
    """Build a silo's half of ``cfg`` and join the trunk over ``session``."""
    half = build_half(cfg, "silo")
    link = TrunkLink(session, cfg.train.grad_accum, cfg.split.activation_dtype, timeout=60)
    model = SplitSilo(half.parts.head, half.parts.tail, link)
    link.averaging = cfg.split.secure_averaging  # announced at join; the trunk checks it
    link.join(examples, shared_settings(cfg, half.model))
    optimizer = make_optimizer(model, cfg.train)
    optimizer.register_step_pre_hook(link.commit)
    scheduler = make_scheduler(optimizer, cfg.train)
    names = PartState(half.model, [half.parts.head, half.parts.tail])
    return SiloEnd(half, model, link, session, optimizer, scheduler, names)


@contextlib.contextmanager
def trunk_server(
    cfg: JobConfig, keys_dir: Path, tls_dir: Path | None = None
) -> Iterator[tuple[TrunkService, Any]]:
    """A trunk service behind an in-process server (``tls_dir`` None) or gRPC + TLS on loopback.

    Yields ``(service, connect_fn)`` where ``connect_fn(name)`` returns a connection.
    """
    identity, enrollment = load_coordinator_keys(keys_dir)
    service = build_service(cfg, identity, enrollment)
    if tls_dir is None:
        server: Any = InProcessServer(service.handle)
        server.start()

        def connect_fn(name: str) -> Any:
            return server.connect(name)
    else:
        server = GrpcStreamServer(service.handle, "127.0.0.1:0", tls=load_tls_material(tls_dir))
        server.start()
        client_tls = load_tls_material(tls_dir, role="client")

        def connect_fn(name: str) -> Any:
            return connect(server.target, tls=client_tls, client_id=name, timeout=20)

    service.target = getattr(server, "target", "")  # type: ignore[attr-defined]
    try:
        yield service, connect_fn
    finally:
        server.stop(0.5)


def open_silo(connect_fn: Any, keys_dir: Path, name: str) -> FrameSession:
    """Connect and run the handshake as silo ``name``."""
    identity, coordinator = load_silo_keys(keys_dir, name)
    session = open_session(connect_fn(name), identity, coordinator, timeout=30)
    session.silo_name, session.keys_dir = name, keys_dir  # for tests that build an averager
    return session


def run_threads(*targets: Any, timeout: float = 120) -> list[BaseException | None]:
    """Run callables in threads; return each one's exception (or None)."""
    errors: list[BaseException | None] = [None] * len(targets)

    def wrap(i: int, fn: Any) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors[i] = exc

    threads = [
        threading.Thread(target=wrap, args=(i, fn), daemon=True) for i, fn in enumerate(targets)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a silo thread hung"
    return errors


def serve_and_join(coordinator: JobConfig, silos: list[JobConfig], timeout: float = 300) -> dict:
    """`runner.serve(coordinator)` and `runner.join` of each silo (``silo-i``, shard i), in
    threads; every one must succeed. Returns {"coordinator": summary, i: silo i's summary}."""
    from silotune.split import runner

    results: dict[Any, Any] = {}

    def serve() -> None:
        results["coordinator"] = runner.serve(coordinator)

    def join(i: int) -> Any:
        return lambda: results.setdefault(i, runner.join(silos[i], f"silo-{i}", shard=i))

    errors = run_threads(serve, *(join(i) for i in range(len(silos))), timeout=timeout)
    assert errors == [None] * (len(silos) + 1), errors
    return results


def make_stream(cfg: JobConfig, half: ModelHalf, shard: int | None = None) -> Any:
    """The training batches of ``cfg`` (IID part ``shard`` of ``split.silos`` if given)."""
    from silotune.data.partition import partition_iid
    from silotune.data.registry import load_splits
    from silotune.data.tasks import make_task
    from silotune.train.loop import BatchStream

    splits = load_splits(cfg.data, seed=cfg.train.seed)
    tokenizer = half.loaded.tokenizer
    task = make_task(tokenizer, "classification", splits.labels, splits.prompt_template, 64)
    train = splits.train
    if shard is not None:
        train = [train[i] for i in partition_iid(len(train), cfg.split.silos, 0)[shard]]
    examples = [task.encode(ex) for ex in train]
    return BatchStream(examples, cfg.train.batch_size, cfg.train.seed, tokenizer.pad_token_id)


def train_silo(end: SiloEnd, cfg: JobConfig, stream: Any, steps: int) -> list[float]:
    """``steps`` split training steps; returns the losses; says goodbye at the end."""

    losses = []
    for step in range(steps):
        out = train_step(
            end.model, stream, step, end.optimizer, end.scheduler, cfg.train,
            torch.device("cpu"), loss_fn=end.model.loss,
        )  # fmt: skip
        losses.append(out.loss)
    end.link.finish()
    return losses


def paired_step(job: Any, optimizer: Any, scheduler: Any, end: SiloEnd, cfg: JobConfig, step: int):
    """One centralized step and the same step through the split silo: ``(want, got)``."""
    want = train_step(job.model, job.stream, step, optimizer, scheduler, cfg.train, job.device)
    got = train_step(
        end.model,
        job.stream,
        step,
        end.optimizer,
        end.scheduler,
        cfg.train,
        job.device,
        loss_fn=end.model.loss,
    )
    return want, got
