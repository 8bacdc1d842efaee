"""An in-process grid: the ServerApp's strategy talks straight to ClientApp handlers.

Same messages and code paths as a Flower run (``clients.app.query`` /
``clients.app.train``), without SuperLink, Ray or processes: for benchmarks
that repeat whole federations many times on one machine, and for tests. Real
deployments and ``flwr run .`` never use it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from flwr.app import Context, Message, MessageType, RecordDict


class LocalGrid:
    """Nodes ``node_ids``; node ``i`` is site ``node_ids.index(i)`` (its ``partition-id``)."""

    def __init__(self, run_config: Mapping[str, Any], node_ids: Iterable[int] = (1, 2),
                 before_send: Callable[[Message], None] | None = None):
        from flwr.supercore.task_identity import TaskIdentity

        if TaskIdentity._run_id is None:  # what a ServerApp process would have set
            TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0
        self.node_ids = list(node_ids)
        self.run_config = dict(run_config)
        self.before_send = before_send

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        from clients import app as client_app

        replies = []
        for msg in messages:
            if self.before_send is not None:
                self.before_send(msg)
            node = msg.metadata.dst_node_id
            ctx = Context(run_id=1, node_id=node, node_config={"partition-id": self.node_ids.index(node)},
                          state=RecordDict(), run_config=self.run_config)
            handler = client_app.query if msg.metadata.message_type == MessageType.QUERY else client_app.train
            try:
                replies.append(handler(msg, ctx))
            except Exception as err:  # noqa: BLE001  as Flower does: the node's failure becomes an error reply
                from flwr.app import Error

                replies.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg))
        return replies
