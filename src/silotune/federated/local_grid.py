"""A Flower ``Grid`` in this process: the real coordinator and ClientApp, no Ray, no SuperLink.

Silos whose state lives in processes this one owns (each silo's enclave, when the adapter runs in
one) cannot run in Ray's worker processes; this grid calls the ClientApp here instead. Message
bodies are deep-copied both ways, as the wire would; every node keeps its own Flower ``Context``;
a ClientApp that raises becomes an error reply, as in Flower, so the coordinator drops that silo.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["LocalGrid", "task_identity"]

FIRST_NODE = 1000


class LocalGrid:
    """The two ``Grid`` methods the coordinator uses, for ``n_nodes`` silos of one ClientApp."""

    def __init__(self, client_app: ClientApp, n_nodes: int) -> None:
        self.app = client_app
        self.contexts = {
            FIRST_NODE + i: Context(
                run_id=1,
                node_id=FIRST_NODE + i,
                node_config={"partition-id": i, "num-partitions": n_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(n_nodes)
        }

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Run each message's stage on its node, one after another; replies in message order."""
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            inbound = Message(
                copy.deepcopy(msg.content),
                dst_node_id=node,
                message_type=msg.metadata.message_type,
                group_id=msg.metadata.group_id,
            )
            try:
                reply = self.app(inbound, self.contexts[node])
                replies.append(Message(copy.deepcopy(reply.content), reply_to=msg))
            except Exception as exc:  # noqa: BLE001 - Flower turns any ClientApp error into a reply
                error = Error(code=2, reason=f"{type(exc).__name__}: {exc}")
                replies.append(Message(error, reply_to=msg))
        return replies


@contextmanager
def task_identity() -> Iterator[None]:
    """Flower stamps every message with the running task's ids; set them here, then restore."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
