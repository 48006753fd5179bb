"""The coordinator's trunk in its three serving modes: sequential, client-batching, server-hierarchical.

Every mode answers the same calls from the per-silo session threads (see
:mod:`silotune.split.trunk`): ``forward`` (activations in, trunk outputs out), ``backward``
(gradient of the outputs in, gradient of the inputs out), ``commit`` (end of an optimizer step),
``sync`` (average adapters across silos), ``finish`` and ``drop`` (a silo vanished).

* ``sequential`` (FL-GLM's released behaviour): one silo's whole step at a time, under a lock.
* ``client-batching``: the live silos' activations are padded to one length, concatenated along the
  batch, run through the trunk once, and each silo gets its slice back; gradients likewise. Each
  silo's gradient is weighted by its share of the rows, so the trunk's gradient is that of the mean
  loss over the union batch, as in one centralized step.
* ``server-hierarchical``: one trunk-adapter replica per silo (the frozen weights are shared, only
  the adapter tensors are copied), trained concurrently and averaged at every sync step.

Trunk gradients are clipped jointly with the silo's: on the last micro-batch the trunk reports the
squared norm of its gradient, the silo clips over its own and the trunk's, and its ``commit``
carries the factor the trunk applies. With one silo a split step is then the centralized step.
"""

from __future__ import annotations

import copy
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from silotune.config import TrainConfig
from silotune.split.averaging import weighted_average
from silotune.split.parts import PartState
from silotune.split.resume import copy_optimizer
from silotune.split.roster import Roster
from silotune.split.session import SplitError
from silotune.train.loop import make_optimizer, make_scheduler

__all__ = ["ENGINES", "Roster", "TrunkEngine", "make_engine"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- trunk compute


@dataclass
class Replica:
    """A trunk (or a replica of its adapter) with its optimizer, scheduler and open graphs."""

    part: nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    graph: tuple[torch.Tensor, torch.Tensor] | None = None  # (inputs, outputs) of the open pass

    def params(self) -> list[torch.Tensor]:
        """The trainable tensors."""
        return [p for p in self.part.parameters() if p.requires_grad]

    def grad_sq(self) -> float:
        """Squared L2 norm of the accumulated gradient."""
        total = 0.0
        for p in self.params():
            if p.grad is not None:
                total += float(torch.linalg.vector_norm(p.grad.float()) ** 2)
        return total

    def zero_grad(self) -> None:
        """Forget accumulated gradients (a step that will not be committed)."""
        for p in self.params():
            p.grad = None

    def step(self, coef: float) -> None:
        """Scale the gradient by the silo's clipping factor, then one AdamW step."""
        if self.optimizer is None:
            return
        grads = [p.grad for p in self.params() if p.grad is not None]
        if coef < 1.0 and grads:
            torch._foreach_mul_(grads, coef)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def _make_replica(part: nn.Module, cfg: TrainConfig) -> Replica:
    params = [p for p in part.parameters() if p.requires_grad]
    if not params:
        return Replica(part, None, None)
    optimizer = make_optimizer(part, cfg)  # SPF deltas with adapter.spf.lr: their own group
    return Replica(part, optimizer, make_scheduler(optimizer, cfg))


def _forward(replica: Replica, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Trunk forward with the graph kept for backward. hidden (B, T, C), mask (B, T)."""
    replica.part.train()
    inputs = hidden.detach().requires_grad_(True)  # leaf: its .grad goes back to the silo
    with torch.enable_grad():
        outputs = replica.part(inputs, mask)  # (B, T, C)
    replica.graph = (inputs, outputs)
    return outputs.detach()


def _backward(replica: Replica, grad: torch.Tensor) -> torch.Tensor:
    """Backward through the open graph; returns the gradient of the trunk inputs (B, T, C)."""
    graph, replica.graph = replica.graph, None
    if graph is None:
        raise SplitError("a backward frame arrived without a forward before it")
    inputs, outputs = graph
    if grad.shape != outputs.shape:
        raise SplitError(
            f"gradient has shape {tuple(grad.shape)}, the trunk output had {tuple(outputs.shape)}"
        )
    outputs.backward(grad.to(device=outputs.device, dtype=outputs.dtype))
    assert inputs.grad is not None
    return inputs.grad


@torch.no_grad()
def _evaluate(replica: Replica, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    was_training = replica.part.training
    replica.part.eval()
    out: torch.Tensor = replica.part(hidden, mask)  # (B, T, C)
    replica.part.train(was_training)
    return out


class TrunkEngine(ABC):
    """Base class: the shared trunk, its adapter state, and the silo-adapter sync point.

    Parameters
    ----------
    trunk
        The trunk part (its trainable tensors are the trunk adapter).
    state
        Maps the trunk's trainable tensors to PEFT names.
    train
        Optimizer settings (the trunk's AdamW and schedule mirror the silos').
    roster
        The live silos.
    device, dtype
        Where and in which dtype the trunk runs.
    """

    mode = "base"

    def __init__(
        self,
        trunk: nn.Module,
        state: PartState,
        train: TrainConfig,
        roster: Roster,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.main = _make_replica(trunk, train)
        self.state = state
        self.train_cfg = train
        self.roster = roster
        self.device = device
        self.dtype = dtype
        self.commits = 0  # optimizer steps of the trunk (or of replica 0's, hierarchical)
        self.resumed = False  # the trunk was restored from a checkpoint (split.resume)
        self._lock = threading.RLock()

    @property
    def lock(self) -> threading.RLock:
        """Held while the trunk's tensors change; a checkpoint reads them under it."""
        return self._lock

    def checkpoint_replica(self) -> Replica:
        """The trunk a checkpoint saves: its adapter is in the model, its optimizer is saved."""
        return self.main

    def _to_device(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(device=self.device, dtype=self.dtype)

    # the calls one session thread makes, in protocol order -----------------------------------

    def add(self, member: str) -> None:  # noqa: B027 - optional hook, no-op by default
        """A silo joined."""

    @abstractmethod
    def forward(self, member: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Trunk outputs for a silo's head activations (kept for its backward)."""

    @abstractmethod
    def backward(self, member: str, grad: torch.Tensor, last: bool) -> tuple[torch.Tensor, float]:
        """Gradient w.r.t. the silo's head activations, and the trunk's squared grad norm."""

    @abstractmethod
    def commit(self, member: str, coef: float) -> None:
        """Apply the silo's share of the trunk update (coef: its gradient-clipping factor)."""

    def evaluate(self, member: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Trunk outputs without a graph (validation)."""
        with self._lock:
            return _evaluate(self.main, self._to_device(hidden), mask.to(self.device))

    def drop(self, member: str) -> None:  # noqa: B027 - optional hook, no-op by default
        """A silo vanished; forget whatever it left half done."""

    def sync(
        self, member: str, silo_state: Mapping[str, torch.Tensor], examples: int
    ) -> dict[str, torch.Tensor]:
        """Average the silo adapters of every live silo (weighted by examples)."""

        def combine(values: dict[str, Any]) -> dict[str, Any]:
            names = sorted(values)
            averaged = weighted_average(
                [values[n][0] for n in names], [float(values[n][1]) for n in names]
            )
            self.after_sync({n: float(values[n][1]) for n in names})
            return dict.fromkeys(names, averaged)

        result: dict[str, torch.Tensor] = self.roster.gather(
            "sync", member, (dict(silo_state), examples), combine
        )
        return result

    def after_sync(self, weights: Mapping[str, float]) -> None:  # noqa: B027 - optional hook
        """Run once per sync round, inside its rendezvous (hierarchical averages its replicas).

        ``weights`` maps each silo whose adapter the round averaged to its example count; plain
        and secure averaging (:mod:`silotune.split.secure_averaging`) both call it.
        """

    def finish(self, member: str) -> dict[str, torch.Tensor]:
        """Wait until every live silo has finished, then return the trunk adapter."""
        result: dict[str, torch.Tensor] = self.roster.gather(
            "finish", member, None, lambda values: dict.fromkeys(values, self.trunk_state())
        )
        return result

    def trunk_state(self) -> dict[str, torch.Tensor]:
        """The trunk adapter's tensors (PEFT names)."""
        with self._lock:
            return self.state.get([self.main.part])


class SequentialEngine(TrunkEngine):
    """One silo's step at a time: the trunk is locked from a silo's first forward to its commit."""

    mode = "sequential"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turn = threading.Lock()
        self._holder: str | None = None

    def forward(self, member: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._holder != member:
            if not self._turn.acquire(timeout=self.roster.timeout):
                raise SplitError(f"silo {member!r} waited {self.roster.timeout:.0f} s for its turn")
            self._holder = member
        with self._lock:
            return _forward(self.main, self._to_device(hidden), mask.to(self.device))

    def backward(self, member: str, grad: torch.Tensor, last: bool) -> tuple[torch.Tensor, float]:
        with self._lock:
            grad_in = _backward(self.main, grad)
            return grad_in, self.main.grad_sq() if last else 0.0

    def commit(self, member: str, coef: float) -> None:
        with self._lock:
            self.main.step(coef)
            self.commits += 1
        self._release(member)

    def evaluate(self, member: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return _evaluate(self.main, self._to_device(hidden), mask.to(self.device))

    def drop(self, member: str) -> None:
        if self._holder == member:
            with self._lock:
                self.main.graph = None
                self.main.zero_grad()  # its half-done step never reaches the trunk adapter
            self._release(member)

    def _release(self, member: str) -> None:
        if self._holder == member:
            self._holder = None
            self._turn.release()


class BatchingEngine(TrunkEngine):
    """Client-batching: one trunk pass over the concatenated activations of all live silos."""

    mode = "client-batching"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._round: dict[str, Any] = {}  # the open round: rows per silo, graph, participants

    def forward(self, member: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        def combine(values: dict[str, Any]) -> dict[str, Any]:
            names = sorted(values)
            width = max(values[n][0].shape[1] for n in names)
            hiddens, masks, rows = [], [], {}
            start = 0
            for n in names:
                h, m = values[n]
                pad = width - h.shape[1]  # right-pad: causal attention keeps real tokens exact
                hiddens.append(nn.functional.pad(h, (0, 0, 0, pad)))  # (B_i, T, C)
                masks.append(nn.functional.pad(m, (0, pad)))  # (B_i, T)
                rows[n] = (start, start + h.shape[0], h.shape[1])
                start += h.shape[0]
            with self._lock:
                out = _forward(
                    self.main,
                    self._to_device(torch.cat(hiddens)),
                    torch.cat(masks).to(self.device),
                )  # (sum B_i, T, C)
            self._round = {"rows": rows, "total": start}
            return {n: out[a:b, :t] for n, (a, b, t) in rows.items()}

        result: torch.Tensor = self.roster.gather("forward", member, (hidden, mask), combine)
        return result

    def backward(self, member: str, grad: torch.Tensor, last: bool) -> tuple[torch.Tensor, float]:
        participants = set(self._round.get("rows", {}))

        def combine(values: dict[str, Any]) -> dict[str, Any]:
            rows, total = self._round["rows"], self._round["total"]
            width = max(t for _, _, t in rows.values())
            c = next(iter(values.values()))[0].shape[-1]
            full = torch.zeros(total, width, c)  # silos that left contribute no gradient
            for n, (g, _) in values.items():
                a, b, t = rows[n]
                if g.shape != (b - a, t, c):
                    raise SplitError(f"silo {n!r} sent a gradient of shape {tuple(g.shape)}")
                full[a:b, :t] = g * ((b - a) / total)  # weight = the silo's share of the rows
            with self._lock:
                grad_in = _backward(self.main, full)  # (sum B_i, T, C)
                sq = self.main.grad_sq() if any(last for _, last in values.values()) else 0.0
            out = {}
            for n in values:
                a, b, t = rows[n]
                out[n] = (grad_in[a:b, :t] * (total / (b - a)), sq)  # undo the row weight
            return out

        result: tuple[torch.Tensor, float] = self.roster.gather(
            "backward", member, (grad, last), combine, expected=lambda: participants
        )
        return result

    def commit(self, member: str, coef: float) -> None:
        def combine(values: dict[str, Any]) -> dict[str, Any]:
            with self._lock:
                self.main.step(min(values.values()))  # the most cautious silo's clipping
                self.commits += 1
            return dict.fromkeys(values, None)

        self.roster.gather("commit", member, coef, combine)

    def drop(self, member: str) -> None:
        with self.roster.cond:
            self.roster.cond.notify_all()


class HierarchicalEngine(TrunkEngine):
    """Server-hierarchical: a trunk-adapter replica per silo, averaged at every sync step."""

    mode = "server-hierarchical"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replicas: dict[str, Replica] = {}
        # Frozen tensors are shared by every replica; only adapter tensors are copied.
        self._frozen = {id(p): p for p in self.main.part.parameters() if not p.requires_grad}
        self._frozen.update({id(b): b for b in self.main.part.buffers()})

    def add(self, member: str) -> None:
        with self._lock:
            part = copy.deepcopy(self.main.part, memo=dict(self._frozen))
            self.replicas[member] = _make_replica(part, self.train_cfg)
            if self.resumed:  # a restored trunk: every replica continues its optimizer
                copy_optimizer(self.main, self.replicas[member])

    def checkpoint_replica(self) -> Replica:
        """The averaged adapter goes into the main copy; the first replica's optimizer is saved."""
        with self._lock:
            self.state.set([self.main.part], self.trunk_state())
            names = sorted(n for n in self.replicas if n in self.roster.examples)
            return self.replicas[names[0]] if names else self.main

    def _replica(self, member: str) -> Replica:
        replica = self.replicas.get(member)
        if replica is None:
            raise SplitError(f"silo {member!r} has no trunk replica (it did not join)")
        return replica

    def forward(self, member: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _forward(self._replica(member), self._to_device(hidden), mask.to(self.device))

    def backward(self, member: str, grad: torch.Tensor, last: bool) -> tuple[torch.Tensor, float]:
        replica = self._replica(member)
        grad_in = _backward(replica, grad)
        return grad_in, replica.grad_sq() if last else 0.0

    def commit(self, member: str, coef: float) -> None:
        self._replica(member).step(coef)
        if member == min(self.replicas, default=member):
            self.commits += 1

    def evaluate(self, member: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _evaluate(self._replica(member), self._to_device(hidden), mask.to(self.device))

    def drop(self, member: str) -> None:
        with self._lock:
            self.replicas.pop(member, None)

    def trunk_state(self) -> dict[str, torch.Tensor]:
        """The live replicas' adapters averaged by the silos' examples (the main copy if none)."""
        with self._lock:
            examples = dict(self.roster.examples)  # silos may leave meanwhile
            names = sorted(n for n in self.replicas if n in examples)
            if not names:
                return self.state.get([self.main.part])
            states = [self.state.get([self.replicas[n].part]) for n in names]
            return weighted_average(states, [float(examples[n]) for n in names])

    def after_sync(self, weights: Mapping[str, float]) -> None:
        names = sorted(n for n in weights if n in self.replicas)
        if not names:
            return
        with self._lock:
            states = [self.state.get([self.replicas[n].part]) for n in names]
            averaged = weighted_average(states, [float(weights[n]) for n in names])
            for part in [self.main.part, *(self.replicas[n].part for n in self.replicas)]:
                self.state.set([part], averaged)


ENGINES: dict[str, type[TrunkEngine]] = {
    "sequential": SequentialEngine,
    "client-batching": BatchingEngine,
    "server-hierarchical": HierarchicalEngine,
}


def make_engine(mode: str, *args: Any, **kwargs: Any) -> TrunkEngine:
    """The engine for ``split.server_mode``."""
    if mode not in ENGINES:
        raise ValueError(f"Unknown split.server_mode {mode!r}; allowed: {', '.join(ENGINES)}")
    return ENGINES[mode](*args, **kwargs)
