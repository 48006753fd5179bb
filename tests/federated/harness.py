"""An in-process Flower Grid: the real ServerApp coordinator and ClientApp silos, without Ray.

Messages are deep-copied in both directions (as the wire would), each node keeps its own Flower
Context across messages, and a ClientApp that raises becomes an error reply, as in Flower.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from silotune.config import JobConfig
from silotune.federated.coordinator import Coordinator
from silotune.federated.local_grid import task_identity
from silotune.federated.pinning import simulation_trust
from silotune.federated.silo import make_client_app
from silotune.train.run_folder import prepare_output_dir

Tamper = Callable[[str, int, RecordDict], None]  # (message type, node id, reply content)


class InProcessGrid:
    """Implements the two Grid methods the coordinator uses."""

    def __init__(self, client_app: ClientApp, n_nodes: int, tamper: Tamper | None = None) -> None:
        self.app = client_app
        self.tamper = tamper
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": n_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(n_nodes)
        }
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            inbound = Message(
                copy.deepcopy(msg.content),
                dst_node_id=node,
                message_type=msg.metadata.message_type,
                group_id=msg.metadata.group_id,
            )
            try:
                reply = self.app(inbound, self.contexts[node])
                content = copy.deepcopy(reply.content)
                if self.tamper is not None:
                    self.tamper(msg.metadata.message_type, node, content)
                replies.append(Message(content, reply_to=msg))
            except Exception as exc:  # noqa: BLE001 - Flower turns any ClientApp error into a reply
                replies.append(
                    Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
                )
        return replies


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
