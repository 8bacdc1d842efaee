"""Personalised detection strategy: every site keeps (and improves) its own model.

Policy only, on Flower's four hooks, driven by Flower's own ``Strategy.start``:
which node gets which message, which replies are usable, what the server keeps
per site. Models are the ServerApp's business (``benchmark_fn``), so this module
never imports torch.

State is keyed by *site id*, not Flower node id: node ids change when a
SuperNode without authentication restarts (and in every simulated run), site ids do not.

Site identity: a site id is bound to the first node that presents it, and a
node to one site (:meth:`PersonalizedStrategy.claim`). Another node that claims a
bound site is refused: its query or reply is dropped with one WARNING naming the
site and both node ids, it gets no train message, and it never touches the
site's weights, identity or metrics. A returning node is recognised by its node
id: an authenticated SuperNode keeps it across restarts of the SuperNode and of
the SuperLink (on its database), since the SuperLink derives it from the
registered public key, so ``site_binding="strict"`` never moves a binding.
SuperNodes without authentication and simulated nodes get a new node id at
every start: with ``site_binding="connected"`` (the default) a binding moves to
a new node once its node is no longer connected. ``on_bind`` persists the
bindings; :meth:`load_bindings` restores them and releases the sites an
operator names.

Round ``r``:

1. ``configure_train``: waits once for the expected nodes, asks the nodes it
   does not know who they are (a ``query`` message each), then builds one
   message *per node*: that site's own weights (its last reply) or, with
   ``aggregation="fedavg"``, the global weights Flower passes in, and the round's
   training config. Rounds up to ``completed_round`` (a resumed run) send
   nothing, a site in ``join_round`` gets nothing before its join round, and
   with ``fraction_train`` < 1 only that share of the sites trains, in turn
   (:meth:`PersonalizedStrategy.sample_nodes`).
2. ``aggregate_train``: replies are validated (a failed, missing or malformed
   reply, weights that are not finite or do not fit the server's model
   (``template``), a site claimed by another node: logged and dropped; the round
   goes on), each site's weights and
   identity are kept, the sites :meth:`sites_to_evaluate` names are scored on the
   shared benchmark (``benchmark_fn``), and ``on_round_end`` gets the round's
   :class:`RoundRecord`. With ``aggregation="fedavg"`` it returns the
   example-weighted average of the replies (Flower sends it back as ``arrays``).
3. ``configure_evaluate`` sends nothing: a personalised model is evaluated by its
   node right after training (own val/test split, in the train reply) and by the
   server on the shared benchmark (step 2). ``aggregate_evaluate`` returns that
   server-side evaluation as the round's MetricRecord.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
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
    benchmark: dict[str, Any] = field(default_factory=dict)  # filled by benchmark_fn
    phase: str = "train"  # "kd" when the site distilled from at least one teacher this round
    evaluated: tuple[str, ...] = ()  # why the server scored it on the benchmark this round (maintenance reasons)
    gallery: list[dict[str, Any]] | None = None  # test keyframes with boxes (common.protocol.parse_gallery), if sent

    @property
    def site_id(self) -> str:
        return self.site[P.SITE_ID]


@dataclass
class RoundRecord:
    """What one round produced, for the ServerApp's per-round outputs (``on_round_end``)."""

    server_round: int
    replies: list[NodeReply]  # the valid replies, one per site
    graph: dict[str, Any] | None = None  # the collaboration graph this round's teachers came from (JSON-ready)
    global_arrays: ArrayRecord | None = None  # the fedavg model, when aggregating


BenchmarkFn = Callable[[ArrayRecord], dict[str, Any]]  # weights -> {"map50", "map50_95", "ap50", "seconds"}
RoundEndFn = Callable[[RoundRecord], None]
BindFn = Callable[[dict[str, int]], None]  # {site id: node id}, after a change
SITE_BINDINGS = ("connected", "strict")


def sender(reply: Message, sent: Iterable[Message]) -> int:
    """The node a reply is about. For a node it no longer hears from, the SuperLink answers itself (an error
    reply from :data:`~flwr.common.constant.SUPERLINK_NODE_ID`) to the message ``sent`` to that node."""
    node_id, to = reply.metadata.src_node_id, reply.metadata.reply_to_message_id
    if node_id == SUPERLINK_NODE_ID and to:
        return next((m.metadata.dst_node_id for m in sent if m.metadata.message_id == to), node_id)
    return node_id


class PersonalizedStrategy(Strategy):
    """Per-site models, server-side evaluation on a shared benchmark.

    Parameters
    ----------
    num_classes : int
        Class count of the detectors (replies are validated against it).
    epochs_per_round : int
        Local epochs each node trains per round.
    benchmark_fn : callable, optional
        Scores a model's weights on the shared benchmark (per-class AP50).
    aggregation : ``"none"`` or ``"fedavg"``
        Personalised models, or one example-weighted average.
    expected_nodes, wait_for_nodes_s : int, float
        Before its first round the strategy waits up to ``wait_for_nodes_s`` for
        ``expected_nodes`` nodes (simulated nodes register a moment late).
    query_timeout_s : float
        How long an identification (``query``) waits for its replies.
    join_round : mapping site id -> round, optional
        Sites that join late: no train message before that round.
    on_round_end : callable, optional
        Called with the :class:`RoundRecord` at the end of each round's ``aggregate_train``.
    site_binding : ``"connected"`` or ``"strict"``
        When a bound site may move to another node: once its node is no longer
        connected, or never (authenticated SuperNodes keep their node id).
    template : ArrayRecord, optional
        The server's model: a reply's weights must have its names, shapes and dtypes.
    on_bind : callable, optional
        Called with ``{site id: node id}`` after the bindings change (the ServerApp persists them).
    """

    def __init__(self, *, num_classes: int, epochs_per_round: int, benchmark_fn: BenchmarkFn | None = None,
                 aggregation: str = "none", train_config: Mapping[str, Any] | None = None, expected_nodes: int = 0,
                 wait_for_nodes_s: float = 120.0, query_timeout_s: float = 120.0,
                 join_round: Mapping[str, int] | None = None, on_round_end: RoundEndFn | None = None,
                 site_binding: str = "connected", template: ArrayRecord | None = None, on_bind: BindFn | None = None,
                 fraction_train: float = 1.0):
        if aggregation not in ("none", "fedavg"):
            raise ValueError(f"aggregation={aggregation!r}: expected 'none' or 'fedavg'")
        if site_binding not in SITE_BINDINGS:
            raise ValueError(f"site_binding={site_binding!r}: expected one of {SITE_BINDINGS}")
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train={fraction_train!r}: expected a share in (0, 1]")
        self.fraction_train = fraction_train
        self.num_classes = num_classes
        self.epochs_per_round = epochs_per_round
        self.benchmark_fn = benchmark_fn
        self.aggregation = aggregation
        self.train_config = dict(train_config or {})
        self.expected_nodes = expected_nodes
        self.wait_for_nodes_s = wait_for_nodes_s
        self.query_timeout_s = query_timeout_s
        self.join_round = dict(join_round or {})
        self.on_round_end = on_round_end
        self.site_binding = site_binding
        self.layout = weights_layout(template) if template is not None and len(template) else None
        self.on_bind = on_bind
        self.completed_round = 0  # rounds up to this one are done (resume): configure_train skips them
        self.site_of: dict[int, str] = {}  # Flower node id -> its bound site id
        self.node_of: dict[str, int] = {}  # site id -> its bound Flower node id
        self.connected: set[int] = set()  # the node ids connected at the last identify
        self.refused: dict[int, str] = {}  # node id -> the bound site it claimed (it gets no train message)
        self._bindings_changed = False
        self.arrays: dict[str, ArrayRecord] = {}  # latest weights per site (its own model)
        self.sites: dict[str, dict[str, Any]] = {}  # identity per site
        self.locations: dict[int, tuple[float, float]] = {}  # node id -> registered (lat, lon), if any
        self.last_round: RoundRecord | None = None
        self._waited = False
        self._sent: dict[int, Message] = {}  # this round's train messages by node id
        self.eligible: list[int] = []  # this round's nodes that may train (fraction_train picks among them)

    def summary(self) -> None:
        log(INFO, "\t├── Personalised models (aggregation: %s)", self.aggregation)
        if self.join_round:
            log(INFO, "\t├── Late sites: %s",
                ", ".join(f"{s} at round {r}" for s, r in sorted(self.join_round.items())))
        if self.fraction_train < 1.0:
            log(INFO, "\t├── Sites trained per round: %s of those connected, in turn", self.fraction_train)
        log(INFO, "\t└── Local epochs per round: %s", self.epochs_per_round)

    # --------------------------------------------------------------- identity
    def identify(self, grid: Grid) -> None:
        """Ask nodes we have not seen which site they are (a ``query`` message each).

        Also reads the locations registered with ``flwr supernode register --location
        "lat,lon"`` (authenticated deployments; ``grid.get_nodes()``), which then win over
        the position a node reports from its node-config.
        """
        self.locations.update(registered_locations(grid))
        self.connected = set(grid.get_node_ids())
        unknown = [n for n in sorted(self.connected) if n not in self.site_of]
        if not unknown:
            return
        messages = [Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
        for reply in grid.send_and_receive(messages=messages, timeout=self.query_timeout_s):
            node_id = sender(reply, messages)
            self.refused.pop(node_id, None)
            try:
                if reply.has_error():
                    raise P.ProtocolError(reply.error.reason)
                if P.SITE not in reply.content:
                    raise P.ProtocolError(f"reply has no '{P.SITE}' record")
                site = P.parse_site(reply.content[P.SITE], self.num_classes)
            except P.ProtocolError as err:
                log(WARNING, "identify: node %s: %s", node_id, err)
                continue
            try:
                self.claim(node_id, site[P.SITE_ID])
            except P.ProtocolError as err:
                log(WARNING, "identify: %s", err)
                self.refused[node_id] = site[P.SITE_ID]
                continue
            self._bind(node_id, site)
        self._save_bindings()
        log(INFO, "identify: %s nodes: %s", len(self.site_of),
            brief(f"{n}={s}" for n, s in sorted(self.site_of.items())))

    def claim(self, node_id: int, site_id: str) -> None:
        """Check that ``node_id`` may speak for ``site_id``; raises :class:`common.protocol.ProtocolError` if not.

        A node speaks for one site, and a site is bound to the first node that presents it. A
        bound site moves to another node only with ``site_binding="connected"`` and only once
        its node is no longer connected (:meth:`_bind` moves it).
        """
        own = self.site_of.get(node_id)
        if own is not None and own != site_id:
            raise P.ProtocolError(f"site-binding: node {node_id} claims {site_id} but is bound to {own}: refused")
        bound = self.node_of.get(site_id)
        if bound is None or bound == node_id:
            return
        if self.site_binding == "connected" and bound not in self.connected:
            return
        state = "connected" if bound in self.connected else "not connected, site-binding strict"
        raise P.ProtocolError(f"site-binding: node {node_id} claims {site_id}, which is bound to node {bound} "
                              f"({state}): refused")

    def _bind(self, node_id: int, site: dict[str, Any]) -> None:
        """Bind ``site`` to ``node_id`` (after :meth:`claim`) and keep its identity."""
        if node_id in self.locations:
            site[P.POSITION_KM] = self.position_km(self.locations[node_id])
        site_id = site[P.SITE_ID]
        bound = self.node_of.get(site_id)
        if bound != node_id:
            if bound is not None:
                self.site_of.pop(bound, None)
                log(INFO, "site-binding: %s moves from node %s (no longer connected) to node %s", site_id, bound,
                    node_id)
            self.site_of[node_id], self.node_of[site_id] = site_id, node_id
            self._bindings_changed = True
        self.refused.pop(node_id, None)
        self.sites[site_id] = site

    def _save_bindings(self) -> None:
        if self._bindings_changed and self.on_bind is not None:
            self.on_bind(dict(sorted(self.node_of.items())))
        self._bindings_changed = False

    def load_bindings(self, bindings: Mapping[str, int], release: Iterable[str] = ()) -> None:
        """Restore ``{site id: node id}`` (a resumed run), less the sites in ``release``: the next node that
        claims a released site is bound to it (the operator's way to move a site to a new node)."""
        self.node_of = {str(s): int(n) for s, n in bindings.items()}
        self.site_of = {n: s for s, n in self.node_of.items()}
        for site_id in release:
            node_id = self.node_of.pop(site_id, None)
            if node_id is None:
                log(WARNING, "site-binding: %s is not bound: nothing to release", site_id)
                continue
            del self.site_of[node_id]
            self._bindings_changed = True
            log(WARNING, "site-binding: %s released from node %s by the operator: the next node that claims it is "
                "bound to it", site_id, node_id)
        log(INFO, "site-binding: %s sites bound (%s)", len(self.node_of), self.site_binding)
        self._save_bindings()

    def position_km(self, latlon: tuple[float, float]) -> list[float]:
        """(lat, lon) -> km on a local plane around the first registered location (stable across rounds)."""
        from common.graph import latlon_to_km

        ref = self.locations[min(self.locations)]
        return [float(v) for v in latlon_to_km(latlon[0], latlon[1], ref[0], ref[1])]

    # ------------------------------------------------------------------ train
    def round_config(self, server_round: int) -> dict[str, Any]:
        return {**self.train_config, P.SERVER_ROUND: server_round, P.EPOCHS: self.epochs_per_round}

    def train_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """The nodes that train this round: all connected ones, less the sites that join later."""
        if not self._waited:
            wait_for_nodes(grid, self.expected_nodes, self.wait_for_nodes_s)
            self._waited = True
        self.identify(grid)
        nodes = []
        for node_id in sorted(grid.get_node_ids()):
            if node_id in self.refused:
                continue  # identify logged why
            site_id = self.site_of.get(node_id)
            if self.join_round.get(site_id, 1) > server_round:
                log(INFO, "configure_train: %s joins at round %s: not sent", site_id, self.join_round[site_id])
                continue
            nodes.append(node_id)
        return nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One train message per node: its site's own weights (fedavg: the global ones) and the round config."""
        self._sent = {}
        if server_round <= self.completed_round:
            log(INFO, "configure_train: round %s is done already (resumed run): skipped", server_round)
            return []
        self.eligible = self.train_nodes(server_round, grid)
        node_ids = self.sample_nodes(server_round, self.eligible)
        initial = arrays if arrays is not None and len(arrays) else None  # empty: every node builds its own
        for node_id in node_ids:
            content = RecordDict({P.CONFIG: ConfigRecord({**self.round_config(server_round), **dict(config or {})})})
            own = self.arrays.get(self.site_of.get(node_id))
            use_global = self.aggregation == "fedavg" and initial is not None
            weights = initial if use_global or own is None else own
            if weights is not None:
                content[P.ARRAYS] = weights
            self._sent[node_id] = Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)
        log(INFO, "configure_train: round %s, %s of %s nodes", server_round, len(self._sent),
            len(grid.get_node_ids()))
        return list(self._sent.values())

    def sample_nodes(self, server_round: int, nodes: list[int]) -> list[int]:
        """The share ``fraction_train`` of ``nodes`` that trains this round, in turn, so that every site trains
        once every ``ceil(1 / fraction_train)`` rounds; a node whose site has no model here yet (new, joining, or
        not identified) always trains.

        The sites with a model, sorted by id, are taken ``k = ceil(fraction_train * n)`` at a time from position
        ``(server_round - 1) * k`` on, wrapping around.

        Examples
        --------
        Sites a-e with models, fraction 0.4: k = 2, so round 1 trains a, b; round 2 c, d; round 3 e, a.
        """
        if self.fraction_train >= 1.0:
            return nodes
        known = sorted((self.site_of[n], n) for n in nodes if self.site_of.get(n) in self.arrays)
        always = [n for n in nodes if self.site_of.get(n) not in self.arrays]
        if not known:
            return nodes
        k = math.ceil(self.fraction_train * len(known))
        start = (server_round - 1) * k
        turn = [known[(start + i) % len(known)][1] for i in range(k)]
        log(INFO, "configure_train: round %s trains %s of %s sites with a model (federation.fraction-train %s)"
            " and %s without", server_round, k, len(known), self.fraction_train, len(always))
        return sorted(turn + always)

    def parse_reply(self, msg: Message) -> NodeReply:
        """Validate one reply; raises :class:`common.protocol.ProtocolError` naming the problem."""
        node_id = sender(msg, self._sent.values())
        if msg.has_error():
            raise P.ProtocolError(f"node {node_id} failed: {msg.error.reason}")
        content = msg.content
        for name in (P.ARRAYS, P.METRICS, P.SITE):
            if name not in content:
                raise P.ProtocolError(f"node {node_id}: reply has no '{name}' record")
        metrics = P.parse_train_metrics(content[P.METRICS], self.num_classes)
        site = P.parse_site(content[P.SITE], self.num_classes)
        check_weights(content[P.ARRAYS], self.layout)
        gallery = None
        if P.GALLERY in content:
            try:
                gallery = P.parse_gallery(content[P.GALLERY])
            except P.ProtocolError as err:  # only the report's pictures are lost, never the round
                log(WARNING, "node %s: ignoring its gallery: %s", node_id, err)
        return NodeReply(node_id, site, metrics, content[P.ARRAYS], gallery=gallery)

    def accept_replies(self, server_round: int, replies: Iterable[Message]) -> list[NodeReply]:
        """Validate replies (a bad one is logged and dropped), keep each site's identity and weights."""
        accepted = []
        for msg in replies:
            try:
                reply = self.parse_reply(msg)
                self.claim(reply.node_id, reply.site_id)
                self.on_reply(server_round, reply)
            except Exception as err:  # noqa: BLE001  a bad reply must never crash the round
                log(WARNING, "aggregate_train: round %s: dropping reply of node %s: %s", server_round,
                    sender(msg, self._sent.values()), err)
                continue
            self._bind(reply.node_id, reply.site)
            self.arrays[reply.site_id] = reply.arrays
            accepted.append(reply)
        self._save_bindings()
        missing = set(self._sent) - {r.node_id for r in accepted}
        if missing:
            log(WARNING, "aggregate_train: round %s: no valid reply from %s nodes: %s (skipped)", server_round,
                len(missing), brief(sorted(missing)))
        log(INFO, "aggregate_train: round %s, %s valid replies", server_round, len(accepted))
        return accepted

    def on_reply(self, server_round: int, reply: NodeReply) -> None:
        """Per-reply policy on top of validation (graph KD: the teachers the student kept); may raise."""

    def sites_to_evaluate(self, server_round: int, replies: list[NodeReply]) -> dict[str, tuple[str, ...]]:
        """``{site: reasons}`` to score on the shared benchmark this round (here: every site, every round)."""
        return {r.site_id: ("every-round",) for r in replies}

    def evaluate_on_benchmark(self, server_round: int, replies: list[NodeReply]) -> None:
        """Score the sites :meth:`sites_to_evaluate` names (a failure costs only that site's score)."""
        if self.benchmark_fn is None:
            return
        plan = self.sites_to_evaluate(server_round, replies)
        for reply in replies:
            if reply.site_id not in plan:
                continue
            try:
                reply.benchmark = self.benchmark_fn(reply.arrays)
            except Exception as err:  # noqa: BLE001
                log(WARNING, "aggregate_train: round %s: cannot evaluate %s: %s", server_round, reply.site_id, err)
                continue
            reply.evaluated = plan[reply.site_id]
            self.on_evaluated(server_round, reply)

    def on_evaluated(self, server_round: int, reply: NodeReply) -> None:
        """A reply has just been scored on the benchmark (graph KD: it becomes the site's profile)."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep each valid reply, evaluate, report; returns the global weights only for fedavg."""
        if server_round <= self.completed_round:
            return None, None
        accepted = self.accept_replies(server_round, replies)
        self.evaluate_on_benchmark(server_round, accepted)
        merged = fedavg(accepted) if self.aggregation == "fedavg" and accepted else None
        self.last_round = RoundRecord(server_round, accepted, self.round_graph(server_round), merged)
        self.completed_round = server_round
        if self.on_round_end is not None:
            self.on_round_end(self.last_round)
        return merged, train_metrics(accepted)

    def round_graph(self, server_round: int) -> dict[str, Any] | None:
        """The graph this round's teachers came from (none here)."""
        return None

    # --------------------------------------------------------------- evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Nothing to send: the nodes evaluate right after training, the server on the shared benchmark."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The round's server-side benchmark evaluation: mean mAP50 over the sites scored this round."""
        record = self.last_round
        if record is None or record.server_round != server_round:
            return None
        scores = [r.benchmark["map50"] for r in record.replies if r.benchmark]
        if not scores:
            return None
        return MetricRecord({"benchmark-map50": sum(scores) / len(scores), "benchmark-sites": len(scores)})


def brief(items: Iterable[Any], limit: int = 10) -> str:
    """``"a, b, c"``, or the first ``limit`` items and ``"... (+N more)"``: log lines stay short at 10,000 sites."""
    items = [str(item) for item in items]
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return (", ".join(items[:limit]) or "none") + more


def weights_layout(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of a model's weights."""
    return {name: (tuple(a.shape), str(a.dtype)) for name, a in arrays.items()}


def check_weights(arrays: ArrayRecord, layout: Mapping[str, tuple[tuple[int, ...], str]] | None) -> None:
    """Raise :class:`common.protocol.ProtocolError` naming the first tensor of a reply's weights that is missing,
    unexpected, of another shape or dtype than ``layout`` (the server's model; ``None``: any), or not finite.

    Shapes are read from the decoded arrays, not from the record's metadata.
    """
    if layout is not None:
        missing, extra = sorted(set(layout) - set(arrays)), sorted(set(arrays) - set(layout))
        if missing or extra:
            raise P.ProtocolError(f"{P.ARRAYS}: do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, array in arrays.items():
        try:
            values = array.numpy()
        except Exception as err:  # noqa: BLE001  undecodable bytes
            raise P.ProtocolError(f"{P.ARRAYS}: '{name}' does not decode: {err}") from None
        if layout is not None and (values.shape, str(values.dtype)) != layout[name]:
            raise P.ProtocolError(f"{P.ARRAYS}: '{name}' is {values.shape} {values.dtype}, the model's "
                                  f"{layout[name][0]} {layout[name][1]}")
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            raise P.ProtocolError(f"{P.ARRAYS}: '{name}' has {int(values.size - np.isfinite(values).sum())} "
                                  f"values that are not finite (NaN or inf)")


def fedavg(replies: list[NodeReply]) -> ArrayRecord:
    """Example-weighted average of the replies' weights (Flower's ``aggregate_arrayrecords``)."""
    content = [RecordDict({"arrays": r.arrays, "metrics": MetricRecord({"n": r.metrics[P.NUM_EXAMPLES]})})
               for r in replies]
    return aggregate_arrayrecords(content, "n")


def train_metrics(replies: list[NodeReply]) -> MetricRecord | None:
    """Example-weighted means of the replies' train loss and own val/test mAP50."""
    total = sum(r.metrics[P.NUM_EXAMPLES] for r in replies)
    if not total:
        return None
    return MetricRecord({key: sum(r.metrics[key] * r.metrics[P.NUM_EXAMPLES] for r in replies) / total
                         for key in (P.TRAIN_LOSS, P.VAL_MAP50, P.TEST_MAP50)})


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
