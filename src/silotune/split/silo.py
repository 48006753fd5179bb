"""The silo's side of split training: head and tail here, the trunk behind an encrypted session.

:class:`SplitSilo` is an ``nn.Module`` that runs ``head -> remote trunk -> tail`` and returns
logits, so the shared :func:`~silotune.train.loop.train_step` and the evaluation code use it like
a whole model. The remote trunk is a custom autograd function: its forward sends the head's
activations and receives the trunk's outputs; its backward sends the tail's gradient and receives
the gradient of the head's outputs. Raw tokens and labels never leave the silo.

Clipping stays exact: the trunk reports the squared norm of its gradient with the last backward
of a step, the silo puts its square root in the gradient of a one-element proxy parameter, so
``clip_grad_norm_`` in ``train_step`` sees the norm over silo and trunk adapters together, and
the factor it applied is sent to the trunk in the ``commit`` frame.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from silotune.split.agreement import (
    differences,
    mismatch_message,
    read_settings,
    settings_digest,
)
from silotune.split.parts import PartState
from silotune.split.secure_averaging import MaskingAverager
from silotune.split.session import FrameSession, SplitError
from silotune.train.loop import Batch, causal_lm_loss
from silotune.transport.frames import (
    KIND_BACKWARD,
    KIND_BYE,
    KIND_COMMIT,
    KIND_FORWARD,
    KIND_JOIN,
    KIND_SYNC,
    Frame,
    FrameError,
    add_noise,
)

if TYPE_CHECKING:
    from silotune.config import JobConfig
    from silotune.crypto.identity import Enrollment, IdentityKey
    from silotune.split.averaging import AdapterAverager

__all__ = ["CoordinatorAverager", "LMOutput", "SplitSilo", "TrunkLink", "make_averager"]

log = logging.getLogger(__name__)


@dataclass
class LMOutput:
    """What a causal LM forward returns, as far as training and evaluation read it."""

    logits: torch.Tensor  # (B, T, V)


class TrunkLink:
    """The silo's end of the session with the trunk: activations out, outputs and gradients in.

    Parameters
    ----------
    session
        An open session with the coordinator.
    grad_accum
        Micro-batches per optimizer step (the last one asks the trunk for its gradient norm).
    activation_dtype
        Wire dtype of activations and gradients (``float32``, ``float16``, ``bfloat16``).
    noise_sigma
        Standard deviation of Gaussian noise added to every activation and gradient this silo
        sends (0 = none).
    seed
        Seed of the noise generator.
    timeout
        Seconds to wait for each answer of the trunk.
    """

    def __init__(
        self,
        session: FrameSession,
        grad_accum: int = 1,
        activation_dtype: str = "float32",
        noise_sigma: float = 0.0,
        seed: int = 0,
        timeout: float = 300.0,
    ) -> None:
        self.session = session
        self.grad_accum = grad_accum
        self.activation_dtype = None if activation_dtype == "float32" else activation_dtype
        self.noise_sigma = noise_sigma
        self.timeout = timeout
        self.generator = torch.Generator().manual_seed(seed)
        self.averaging = "none"  # split.secure_averaging, announced at join (make_averager sets it)
        self.step = 0  # optimizer steps committed
        self.micro = 0  # micro-batches sent in the current step
        self.trunk_norm = 0.0  # norm of the trunk's gradient at the end of the step
        self.proxy: nn.Parameter | None = None

    def _noisy(self, tensor: torch.Tensor) -> torch.Tensor:
        return add_noise(tensor.detach().float().cpu(), self.noise_sigma, self.generator)

    def _expect(self, kind: str) -> Frame:
        frame = self.session.recv(self.timeout)
        if frame.kind != kind:
            raise SplitError(f"expected a '{kind}' frame from the coordinator, got '{frame.kind}'")
        return frame

    def _tensor(self, frame: Frame, name: str, shape: torch.Size) -> torch.Tensor:
        tensor = frame.tensors.get(name)
        if tensor is None or tuple(tensor.shape) != tuple(shape):
            got = None if tensor is None else tuple(tensor.shape)
            raise FrameError(f"the trunk answered '{name}' of shape {got}, expected {tuple(shape)}")
        return tensor

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, train: bool) -> torch.Tensor:
        """Send head outputs ``(B, T, C)`` and the mask; return the trunk outputs ``(B, T, C)``."""
        tensors = {"hidden": self._noisy(hidden), "mask": mask.detach().long().cpu()}
        meta = {"train": train, "micro": self.micro}
        wire = self.activation_dtype
        self.session.send(KIND_FORWARD, self.step, tensors, meta, activation_dtype=wire)
        out = self._tensor(self._expect(KIND_FORWARD), "hidden", hidden.shape)
        return out.to(device=hidden.device, dtype=hidden.dtype)

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        """Send the gradient of the trunk outputs; return the gradient of the head outputs."""
        last = self.micro == self.grad_accum - 1
        meta = {"last": last}
        wire = self.activation_dtype
        self.session.send(
            KIND_BACKWARD, self.step, {"grad": self._noisy(grad)}, meta, activation_dtype=wire
        )
        frame = self._expect(KIND_BACKWARD)
        grad_in = self._tensor(frame, "grad", grad.shape).to(device=grad.device, dtype=grad.dtype)
        self.micro += 1
        if last:
            trunk_sq = frame.meta.get("trunk_sq", 0.0)
            if isinstance(trunk_sq, bool) or not isinstance(trunk_sq, (int, float)):
                raise FrameError(f"trunk_sq must be a number, got {trunk_sq!r}")
            self.trunk_norm = float(trunk_sq) ** 0.5
            if self.proxy is not None:  # read by clip_grad_norm_ in train_step
                self.proxy.grad = torch.full_like(self.proxy, self.trunk_norm)
        return grad_in

    def commit(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        """Optimizer pre-step hook: tell the trunk to step, with the clipping factor applied here."""
        coef = 1.0
        if self.proxy is not None and self.proxy.grad is not None and self.trunk_norm > 0:
            coef = min(1.0, float(self.proxy.grad.item()) / self.trunk_norm)
        self.session.send(KIND_COMMIT, self.step, meta={"coef": coef})
        self.step += 1
        self.micro = 0

    def join(self, examples: int, settings: Mapping[str, Any]) -> None:
        """Announce this silo and agree on the job's shared settings with the coordinator.

        The ``join`` frame carries the example count (it weighs this silo's adapter), how this
        silo averages, and its :func:`~silotune.split.agreement.shared_settings` with their digest;
        the coordinator answers with its own.

        Raises
        ------
        SplitError
            If the settings differ, naming every differing key and both values (the coordinator
            refuses this silo too).
        """
        digest = settings_digest(settings)
        meta = {
            "examples": examples,
            "averaging": self.averaging,
            "settings": dict(settings),
            "digest": digest,
        }
        self.session.send(KIND_JOIN, 0, meta=meta)
        theirs = read_settings(self._expect(KIND_JOIN).meta, "coordinator's join")
        if differences(settings, theirs):
            raise SplitError(
                "the coordinator refused this silo at join: its settings differ from the "
                f"coordinator's: {mismatch_message(settings, theirs)}; set them as the "
                "coordinator has them"
            )
        log.info("Split settings agree with the coordinator's (digest %s).", digest[:16])

    def sync(self, state: Mapping[str, torch.Tensor], examples: int) -> dict[str, torch.Tensor]:
        """Send this silo's adapter tensors; return the average over the live silos."""
        self.session.send_state(KIND_SYNC, self.step, state, {"examples": examples})
        averaged = self.session.recv_state(self._expect(KIND_SYNC), self.timeout)
        if set(averaged) != set(state):
            raise FrameError("the averaged adapter does not hold this silo's tensors")
        return averaged

    def finish(self) -> dict[str, torch.Tensor]:
        """Say goodbye; returns the trunk adapter (once every silo has finished)."""
        self.session.send(KIND_BYE, self.step)
        return self.session.recv_state(self._expect(KIND_BYE), self.timeout)


class _RemoteTrunk(torch.autograd.Function):
    """Autograd across the network: forward and backward of the trunk run on the coordinator."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, anchor: torch.Tensor, link: TrunkLink, mask: torch.Tensor
    ) -> torch.Tensor:
        ctx.link = link
        return link.forward(hidden, mask, train=True)  # (B, T, C)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        grad_in = ctx.link.backward(grad)  # (B, T, C)
        return (grad_in if ctx.needs_input_grad[0] else None), None, None, None


class SplitSilo(nn.Module):
    """``head -> remote trunk -> tail`` as one module: ``forward(input_ids, attention_mask)``.

    Parameters
    ----------
    head, tail
        The silo's parts (views on its PEFT model).
    link
        The session with the trunk.
    """

    # Evaluation may pass a segment mask (silotune.models.segments): head, trunk and tail each
    # rebuild the attention from it, so one-pass label scoring works across the split.
    accepts_segment_mask = True

    def __init__(self, head: nn.Module, tail: nn.Module, link: TrunkLink) -> None:
        super().__init__()
        self.head = head
        self.tail = tail
        self.link = link
        # Carries the trunk's gradient norm into clip_grad_norm_; also forces the remote backward
        # to run when the head has nothing to train (head_layers = 0).
        self.trunk_norm_proxy = nn.Parameter(torch.zeros(1))
        link.proxy = self.trunk_norm_proxy

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> LMOutput:
        """Logits ``(B, T, V)`` of ``input_ids (B, T)``; in training mode the graph spans the trunk."""
        hidden = self.head(input_ids, attention_mask)  # (B, T, C)
        if self.training:
            hidden = _RemoteTrunk.apply(hidden, self.trunk_norm_proxy, self.link, attention_mask)
        else:
            hidden = self.link.forward(hidden, attention_mask, train=False)  # (B, T, C)
        return LMOutput(logits=self.tail(hidden, attention_mask))  # (B, T, V)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """``loss_fn`` for ``train_step``: the causal-LM loss through head, trunk and tail."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return causal_lm_loss(out.logits, batch["labels"])


class CoordinatorAverager:
    """:class:`~silotune.split.averaging.AdapterAverager` that averages in clear at the coordinator.

    ``split.secure_averaging: none``. The coordinator sees each silo's head/tail adapter tensors
    (they travel AEAD-encrypted, so nobody else does); the default, ``masking``, is
    :class:`~silotune.split.secure_averaging.MaskingAverager`.
    """

    def __init__(self, link: TrunkLink) -> None:
        self.link = link

    def average(
        self, step: int, state: Mapping[str, torch.Tensor], examples: int
    ) -> dict[str, torch.Tensor]:
        """Return the weighted average of every live silo's ``state``."""
        return self.link.sync(state, examples)


def make_averager(
    cfg: JobConfig,
    link: TrunkLink,
    identity: IdentityKey | None = None,
    enrollment: Enrollment | None = None,
    name: str | None = None,
) -> AdapterAverager:
    """The silo-adapter averager ``split.secure_averaging`` asks for (call it before ``join``).

    The link announces the choice in its ``join`` frame, so the coordinator can refuse a silo
    that averages differently from the others. ``masking`` needs this silo's identity key and the
    enrollment: every peer key of a round must be signed by an enrolled silo.
    """
    link.averaging = cfg.split.secure_averaging
    if link.averaging == "masking":
        if identity is None or enrollment is None:
            raise SplitError(
                "split.secure_averaging masking needs this silo's identity key and the "
                "enrollment (split.keys_dir/enrollment.json) to check its peers' keys"
            )
        name = name or cfg.split.silo_name
        return MaskingAverager(link, cfg.split.secagg_clip, identity, enrollment, name)
    return CoordinatorAverager(link)


def silo_parts_state(model: nn.Module, head: nn.Module, tail: nn.Module) -> PartState:
    """Name map for the silo's trainable tensors (head and tail adapters)."""
    return PartState(model, [head, tail])  # type: ignore[arg-type]
