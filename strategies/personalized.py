"""Personalised detection strategy: every site keeps (and improves) its own model.

Policy only, as Flower's own strategies: which node gets which message, which
replies are usable, what the server keeps per site. Models and evaluation are
the ServerApp's business (``evaluate_fn``), so this module never imports torch.

State is keyed by *site id*, not Flower node id: node ids change when a
SuperNode restarts (and when a killed server resumes), site ids do not. Before
the first round (and whenever an unknown node shows up) the strategy asks the
nodes who they are with a ``query`` message.

Round ``r``:

1. ``configure_train``: one message *per node*, carrying that site's own
   weights (from its last reply) and the round's training config; the
   graph-guided KD strategy builds on this to send each student its teachers.
2. ``aggregate_train``: replies are validated (a failed, missing or malformed
   reply is logged and skipped; the round goes on), each site's weights and
   identity are kept, and ``evaluate_fn`` scores the returned model on the
   shared benchmark. With ``aggregation="fedavg"`` the kept weights are
   replaced by their example-weighted average (one global model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common import protocol as P


@dataclass
class NodeReply:
    """A validated train reply of one node in one round."""

    node_id: int
    site: dict[str, Any]
    metrics: dict[str, Any]
    arrays: ArrayRecord
    benchmark: dict[str, Any] = field(default_factory=dict)  # filled by evaluate_fn
    phase: str = "train"  # "kd" when the site distilled from at least one teacher this round

    @property
    def site_id(self) -> str:
        return self.site[P.SITE_ID]


EvaluateFn = Callable[[NodeReply], dict[str, Any]]
RoundEndFn = Callable[[int, list[NodeReply]], None]


class PersonalizedStrategy(Strategy):
    """Per-site models, server-side evaluation on a shared benchmark."""

    def __init__(self, *, num_classes: int, epochs_per_round: int, evaluate_fn: EvaluateFn | None,
                 aggregation: str = "none", train_config: dict[str, Any] | None = None):
        if aggregation not in ("none", "fedavg"):
            raise ValueError(f"aggregation={aggregation!r}: expected 'none' or 'fedavg'")
        self.num_classes = num_classes
        self.epochs_per_round = epochs_per_round
        self.evaluate_fn = evaluate_fn
        self.aggregation = aggregation
        self.train_config = dict(train_config or {})
        self.site_of: dict[int, str] = {}  # Flower node id -> site id
        self.arrays: dict[str, ArrayRecord] = {}  # latest weights per site
        self.sites: dict[str, dict[str, Any]] = {}  # identity per site
        self.locations: dict[int, tuple[float, float]] = {}  # node id -> registered (lat, lon), if any
        self.last_replies: list[NodeReply] = []
        self.initial_arrays: ArrayRecord | None = None

    def summary(self) -> None:
        log(INFO, "\t├── Personalised models (aggregation: %s)", self.aggregation)
        log(INFO, "\t└── Local epochs per round: %s", self.epochs_per_round)

    # --------------------------------------------------------------- identity
    def identify(self, grid: Grid, timeout: float = 120.0) -> None:
        """Ask nodes we have not seen which site they are (a ``query`` message each).

        Also reads the locations registered with ``flwr supernode register --location
        "lat,lon"`` (authenticated deployments; ``grid.get_nodes()``), which then win over
        the position a node reports from its node-config.
        """
        self.locations.update(registered_locations(grid))
        unknown = [n for n in sorted(grid.get_node_ids()) if n not in self.site_of]
        if not unknown:
            return
        messages = [Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
        for reply in grid.send_and_receive(messages=messages, timeout=timeout):
            node_id = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise P.ProtocolError(reply.error.reason)
                if P.SITE not in reply.content:
                    raise P.ProtocolError(f"reply has no '{P.SITE}' record")
                site = P.parse_site(reply.content[P.SITE], self.num_classes)
            except P.ProtocolError as err:
                log(WARNING, "identify: node %s: %s", node_id, err)
                continue
            self._bind(node_id, site)
        log(INFO, "identify: %s", ", ".join(f"{n}={s}" for n, s in sorted(self.site_of.items())) or "none")

    def _bind(self, node_id: int, site: dict[str, Any]) -> None:
        if node_id in self.locations:
            site[P.POSITION_KM] = self.position_km(self.locations[node_id])
        site_id = site[P.SITE_ID]
        for other, sid in list(self.site_of.items()):  # a restarted site comes back under a new node id
            if sid == site_id and other != node_id:
                del self.site_of[other]
        self.site_of[node_id] = site_id
        self.sites[site_id] = site

    def position_km(self, latlon: tuple[float, float]) -> list[float]:
        """(lat, lon) -> km on a local plane around the first registered location (stable across rounds)."""
        from common.graph import latlon_to_km

        ref = self.locations[min(self.locations)]
        return [float(v) for v in latlon_to_km(latlon[0], latlon[1], ref[0], ref[1])]

    # ------------------------------------------------------------------ train
    def round_config(self, server_round: int) -> dict[str, Any]:
        return {**self.train_config, P.SERVER_ROUND: server_round, P.EPOCHS: self.epochs_per_round}

    def configure_train(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        node_ids = sorted(grid.get_node_ids())
        log(INFO, "configure_train: round %s, %s nodes", server_round, len(node_ids))
        messages = []
        for node_id in node_ids:
            content = RecordDict({P.CONFIG: ConfigRecord({**self.round_config(server_round), **dict(config)})})
            weights = self.arrays.get(self.site_of.get(node_id), arrays)
            if weights is not None:
                content[P.ARRAYS] = weights
            messages.append(Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN))
        return messages

    def parse_reply(self, msg: Message) -> NodeReply:
        """Validate one reply; raises :class:`common.protocol.ProtocolError` naming the problem."""
        node_id = msg.metadata.src_node_id
        if msg.has_error():
            raise P.ProtocolError(f"node {node_id} failed: {msg.error.reason}")
        content = msg.content
        for name in (P.ARRAYS, P.METRICS, P.SITE):
            if name not in content:
                raise P.ProtocolError(f"node {node_id}: reply has no '{name}' record")
        metrics = P.parse_train_metrics(content[P.METRICS], self.num_classes)
        site = P.parse_site(content[P.SITE], self.num_classes)
        return NodeReply(node_id, site, metrics, content[P.ARRAYS])

    def accept_replies(self, server_round: int, replies: Iterable[Message],
                       evaluate: Callable[[NodeReply], bool] = lambda reply: True) -> list[NodeReply]:
        """Validate replies, keep each site's weights, score those ``evaluate`` selects."""
        accepted = []
        for msg in replies:
            try:
                reply = self.parse_reply(msg)
                if self.evaluate_fn is not None and evaluate(reply):
                    reply.benchmark = self.evaluate_fn(reply)
            except Exception as err:  # noqa: BLE001  a bad reply must never crash the round
                log(WARNING, "train: round %s: dropping reply of node %s: %s", server_round,
                    msg.metadata.src_node_id, err)
                continue
            self._bind(reply.node_id, reply.site)
            self.arrays[reply.site_id] = reply.arrays
            accepted.append(reply)
        log(INFO, "train: round %s, %s valid replies", server_round, len(accepted))
        return accepted

    def evaluate_train_reply(self, reply: NodeReply) -> bool:
        """Whether to score this train reply on the benchmark right away (here: always)."""
        return True

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep each valid reply; returns the global weights only for fedavg."""
        self.last_replies = self.accept_replies(server_round, replies, evaluate=self.evaluate_train_reply)
        if self.aggregation != "fedavg" or not self.last_replies:
            return None, None
        content = [RecordDict({"arrays": r.arrays, "metrics": MetricRecord({"n": r.metrics[P.NUM_EXAMPLES]})})
                   for r in self.last_replies]
        merged = aggregate_arrayrecords(content, "n")
        for site_id in self.arrays:
            self.arrays[site_id] = merged
        return merged, None

    # --------------------------------------------------------------- evaluate
    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # evaluation happens on the server, where the shared benchmark is

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    # ------------------------------------------------------------------ loop
    def send(self, grid: Grid, messages: list[Message], timeout: float, what: str) -> list[Message]:
        """``send_and_receive`` that logs the nodes that did not answer."""
        replies = list(grid.send_and_receive(messages=messages, timeout=timeout))
        missing = {m.metadata.dst_node_id for m in messages} - {r.metadata.src_node_id for r in replies}
        if missing:
            log(WARNING, "%s: no reply from nodes %s (skipped)", what, sorted(missing))
        return replies

    def run_round(self, grid: Grid, server_round: int, timeout: float) -> list[NodeReply]:
        """One round; returns the round's accepted replies."""
        self.identify(grid)
        messages = list(self.configure_train(server_round, self.initial_arrays, ConfigRecord(), grid))
        self.aggregate_train(server_round, self.send(grid, messages, timeout, f"round {server_round}"))
        return self.last_replies

    def start(self, grid: Grid, *, num_rounds: int, expected_nodes: int, wait_for_nodes_s: float = 120.0,
              timeout: float = 3600.0, first_round: int = 1, on_round_end: RoundEndFn | None = None,
              initial_arrays: ArrayRecord | None = None) -> None:
        """Run rounds ``first_round..num_rounds``; ``on_round_end`` sees each round's valid replies; a site the
        strategy has no weights of starts from ``initial_arrays`` (None: from scratch)."""
        self.initial_arrays = initial_arrays
        self.summary()
        wait_for_nodes(grid, expected_nodes, wait_for_nodes_s)
        for server_round in range(first_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            replies = self.run_round(grid, server_round, timeout)
            if on_round_end is not None:
                on_round_end(server_round, replies)


def registered_locations(grid: Grid) -> dict[int, tuple[float, float]]:
    """``{node id: (lat, lon)}`` of the nodes registered with a location (empty in simulation)."""
    found = {}
    try:
        nodes = list(grid.get_nodes())
    except (AttributeError, NotImplementedError):
        return found
    for node in nodes:
        text = getattr(node, "location", "") or ""
        try:
            lat, lon = (float(v) for v in text.split(","))
        except ValueError:
            if text:
                log(WARNING, "node %s: ignoring location %r (expected 'lat,lon')", node.node_id, text)
            continue
        found[int(node.node_id)] = (lat, lon)
    return found


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float, poll_s: float = 1.0) -> list[int]:
    """Wait until ``expected`` nodes are connected (simulated nodes register a moment late)."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    if len(nodes) < expected:
        log(WARNING, "only %s of %s expected nodes connected after %.0fs; going on with them",
            len(nodes), expected, timeout_s)
    else:
        log(INFO, "%s nodes connected", len(nodes))
    return nodes
