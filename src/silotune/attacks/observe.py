"""Run a real split job in process and keep what the coordinator (or its host) observes.

The attacks of :mod:`silotune.attacks` never re-derive what a party sees: they read it from the
protocol path. :func:`observe_split` runs one silo against the real :class:`TrunkService` (the
same frames, AEAD channel, wire dtype and noise as ``silotune train``), with the coordinator's
trunk engine wrapped in a recorder that keeps every tensor the engine is handed:

* ``forward``: the head outputs ``hidden (B, T, C)`` and the attention ``mask (B, T)`` of every
  training micro-batch, as decoded from the silo's forward frames (noise and wire dtype included);
* ``backward``: the gradient of the loss with respect to the trunk's outputs ``grad (B, T, C)``
  that the silo's tail sends back;
* ``trunk_out``: what the trunk answered (the coordinator's own computation).

With ``split.trunk_in_enclave`` the trunk runs in the simulated enclave and the coordinator's
host relays the session; its observation is then every relayed message (ciphertext), tapped at
the relay. The silo's batches are kept beside the observation as the ground truth the attacks are
scored against; no attack reads them.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from silotune.config import JobConfig
from silotune.data.registry import load_splits
from silotune.data.tasks import make_task
from silotune.errors import ConfigError
from silotune.eval.evaluate import evaluate
from silotune.split.agreement import shared_settings
from silotune.split.keys import load_coordinator_keys, load_silo_keys, write_job_keys
from silotune.split.parts import PartState, build_half, check_split_config
from silotune.split.runner import build_service
from silotune.split.session import open_session
from silotune.split.silo import SplitSilo, TrunkLink
from silotune.train.loop import BatchStream, make_optimizer, make_scheduler, train_step
from silotune.transport import InProcessServer

__all__ = ["RecordingEngine", "SplitObservation", "observe_split"]

log = logging.getLogger(__name__)

SILO = "silo-0"


@dataclass
class SplitObservation:
    """What the coordinator saw in a split run, and the truth to score attacks against."""

    hidden: list[torch.Tensor] = field(default_factory=list)  # forward frames, (B, T, C) each
    mask: list[torch.Tensor] = field(default_factory=list)  # (B, T) each
    grad: list[torch.Tensor] = field(default_factory=list)  # backward frames, (B, T, C) each
    trunk_out: list[torch.Tensor] = field(default_factory=list)  # trunk answers, (B, T, C)
    step: list[int] = field(default_factory=list)  # optimizer step of each forward frame
    relayed: list[tuple[str, bytes]] = field(default_factory=list)  # enclave: host's view
    # Ground truth (the silo's own batches), never read by an attack.
    input_ids: list[torch.Tensor] = field(default_factory=list)  # (B, T) each
    labels: list[torch.Tensor] = field(default_factory=list)  # (B, T) each, -100 = no loss
    attention: list[torch.Tensor] = field(default_factory=list)  # (B, T) each, the silo's mask
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    test: dict[str, float] = field(default_factory=dict)

    def frames_from(self, step: int) -> list[int]:
        """Indices of the forward frames sent at optimizer step ``step`` or later."""
        return [i for i, s in enumerate(self.step) if s >= step]


class RecordingEngine:
    """A trunk engine that keeps what it is handed, then does exactly what the engine does."""

    def __init__(self, engine: Any, seen: SplitObservation, steps: Callable[[], int]) -> None:
        self._engine = engine
        self._seen = seen
        self._steps = steps

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def forward(self, member: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._seen.hidden.append(hidden.detach().float().cpu().clone())
        self._seen.mask.append(mask.detach().cpu().clone())
        self._seen.step.append(self._steps())
        out = self._engine.forward(member, hidden, mask)
        self._seen.trunk_out.append(out.detach().float().cpu().clone())
        return out

    def backward(self, member: str, grad: torch.Tensor, last: bool) -> tuple[torch.Tensor, float]:
        self._seen.grad.append(grad.detach().float().cpu().clone())
        return self._engine.backward(member, grad, last)


def _stream(cfg: JobConfig, tokenizer: Any) -> tuple[BatchStream, Any, Any]:
    splits = load_splits(cfg.data, seed=cfg.train.seed)
    task = make_task(
        tokenizer, cfg.data.task, splits.labels, splits.prompt_template, cfg.data.max_length
    )
    examples = [task.encode(ex) for ex in splits.train]
    stream = BatchStream(examples, cfg.train.batch_size, cfg.train.seed, tokenizer.pad_token_id)
    return stream, task, splits


def _load_adapter(half: Any, folder: Path) -> None:
    """Set the silo's head and tail adapters from a saved PEFT adapter folder."""
    from safetensors.torch import load_file

    from silotune.adapters.peft_adapters import ADAPTER_WEIGHTS

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"--run: {path} does not exist; pass a finished run's output_dir")
    parts = [half.parts.head, half.parts.tail]
    names = PartState(half.model, parts)
    state = load_file(path)
    missing = [peft for _, _, peft in names.names if peft not in state]
    if missing:
        raise ConfigError(f"--run: {path} lacks the silo adapter tensor {missing[0]}")
    names.set(parts, {peft: state[peft] for _, _, peft in names.names})


def observe_split(
    cfg: JobConfig,
    steps: int | None = None,
    *,
    eval_examples: int = 0,
    adapter: Path | None = None,
) -> SplitObservation:
    """Train ``steps`` split steps of ``cfg`` (one silo, in process) and return the observation.

    Parameters
    ----------
    cfg
        A ``mode: split`` job; its ``split`` section (head/tail layers, noise, wire dtype,
        trunk in the enclave) is what the observation depends on.
    steps
        Optimizer steps to run (default ``train.max_steps``).
    eval_examples
        If positive, the silo's classification accuracy on that many test examples after
        training goes into ``test`` (the accuracy cost of the setting).
    adapter
        A finished run's ``adapter/`` folder: the silo starts from its head and tail adapters
        (the leakage of a trained job).
    """
    check_split_config(cfg)
    steps = cfg.train.max_steps if steps is None else steps
    seen = SplitObservation()
    with tempfile.TemporaryDirectory(prefix="silotune-attack-") as tmp:
        keys = Path(tmp) / "keys"
        write_job_keys(keys, [SILO])
        job = cfg.model_copy(deep=True)
        job.split.silos, job.split.secure_averaging, job.split.keys_dir = 1, "none", keys
        identity, enrollment = load_coordinator_keys(keys)
        link_box: list[TrunkLink] = []
        enclave = None
        if job.split.trunk_in_enclave:
            from silotune.crypto.identity import IdentityKey
            from silotune.split.enclave_trunk import EnclaveTrunk

            platform = IdentityKey.generate()
            platform.public.save(Path(tmp) / "platform.pub")
            job.enclave.platform_key = Path(tmp) / "platform.pub"
            enclave = EnclaveTrunk.start(
                job, enrollment, platform, threads=1, tap=lambda d, m: seen.relayed.append((d, m))
            )
            server = InProcessServer(enclave.handle)
        else:
            service = build_service(job, identity, enrollment)
            steps_done = lambda: link_box[0].step if link_box else 0  # noqa: E731
            service.engine = RecordingEngine(service.engine, seen, steps_done)  # type: ignore[assignment]
            server = InProcessServer(service.handle)
        server.start()
        try:
            _run_silo(job, server, keys, seen, steps, eval_examples, link_box, adapter)
        finally:
            server.stop(1.0)
            if enclave is not None:
                enclave.close()
    return seen


def _run_silo(
    job: JobConfig,
    server: InProcessServer,
    keys: Path,
    seen: SplitObservation,
    steps: int,
    eval_examples: int,
    link_box: list[TrunkLink],
    adapter: Path | None,
) -> None:
    connection = server.connect(SILO)
    if job.split.trunk_in_enclave:
        from silotune.split.attest import attest_trunk, trunk_policy
        from silotune.split.keys import load_silo_identity

        coordinator = attest_trunk(connection, trunk_policy(job), job.split.timeout_s)
        identity = load_silo_identity(keys, SILO)
    else:
        identity, coordinator = load_silo_keys(keys, SILO)
    session = open_session(connection, identity, coordinator, timeout=job.split.timeout_s)
    half = build_half(job, "silo")
    if adapter is not None:
        _load_adapter(half, adapter)
    s, t = job.split, job.train
    link = TrunkLink(session, t.grad_accum, s.activation_dtype, s.noise_sigma, t.seed, s.timeout_s)
    link_box.append(link)
    device = half.loaded.device
    model = SplitSilo(half.parts.head, half.parts.tail, link).to(device)
    stream, task, splits = _stream(job, half.loaded.tokenizer)
    link.join(len(stream.examples), shared_settings(job, half.model))
    optimizer = make_optimizer(model, t)
    optimizer.register_step_pre_hook(link.commit)
    scheduler = make_scheduler(optimizer, t)

    def loss_fn(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        seen.input_ids.append(batch["input_ids"].detach().cpu().clone())
        seen.labels.append(batch["labels"].detach().cpu().clone())
        seen.attention.append(batch["attention_mask"].detach().cpu().clone())
        return model.loss(module, batch)

    try:
        for step in range(steps):
            started = time.perf_counter()
            out = train_step(model, stream, step, optimizer, scheduler, t, device, loss_fn=loss_fn)
            seen.step_seconds.append(time.perf_counter() - started)
            seen.losses.append(out.loss)
        if eval_examples > 0:
            examples = splits.test[:eval_examples]
            seen.test = evaluate(model, task, examples, t.eval_batch_size, device)
        link.finish()
    finally:
        session.close()
