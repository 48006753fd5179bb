"""An in-process Flower Grid: the real ServerApp coordinator and ClientApp silos, without Ray.

Messages are deep-copied in both directions (as the wire would), each node keeps its own Flower
Context across messages, and a ClientApp that raises becomes an error reply, as in Flower.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from silotune.config import JobConfig
from silotune.federated.coordinator import Coordinator
from silotune.federated.local_grid import LocalGrid, task_identity
from silotune.federated.pinning import simulation_trust
from silotune.federated.silo import make_client_app
from silotune.train.run_folder import prepare_output_dir

Tamper = Callable[[str, int, RecordDict], None]  # (message type, node id, reply content)


class InProcessGrid(LocalGrid):
    """silotune's in-process grid that also records what the coordinator sent and lets a test
    tamper with each silo's reply before the coordinator reads it."""

    def __init__(self, client_app: ClientApp, n_nodes: int, tamper: Tamper | None = None) -> None:
        super().__init__(client_app if tamper is None else _tampering(client_app, tamper), n_nodes)
        self.sent: list[Message] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        self.sent.extend(messages)
        return super().send_and_receive(messages, timeout=timeout)


def _tampering(client_app: ClientApp, tamper: Tamper) -> Callable[[Message, Context], Message]:
    """The ClientApp, with `tamper(message type, node, reply content)` applied to a copy of each
    reply (the silo's own objects stay untouched)."""

    def app(inbound: Message, context: Context) -> Message:
        content = copy.deepcopy(client_app(inbound, context).content)
        tamper(inbound.metadata.message_type, context.node_id, content)
        return Message(content, reply_to=inbound)

    return app


def run_in_process(
    cfg: JobConfig,
    mods: list[Any] | None = None,
    tamper: Tamper | None = None,
    resume: bool = False,
    overwrite: bool = True,
) -> tuple[dict[str, Any], Coordinator, InProcessGrid]:
    """Run a whole federated job in this process; returns (summary, coordinator, grid)."""
    prepare_output_dir(cfg, resume, overwrite and not resume)
    trust = simulation_trust(cfg.federation.silos)
    grid = InProcessGrid(make_client_app(cfg, mods, trust), cfg.federation.silos, tamper)
    with task_identity():
        coordinator = Coordinator(  # type: ignore[arg-type]
            cfg, grid, resume=resume, progress=False, enrollment=trust[0].enrollment
        )
        summary = coordinator.run()
    return summary, coordinator, grid
