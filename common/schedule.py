"""Graph maintenance: when to re-evaluate edge models on the benchmark (paper section 4.3, Figure 4).

The collaboration graph needs each model's benchmark AP vector. Evaluating every
model every round is what the paper avoids; :class:`GraphMaintenance` decides, once
per round, which nodes to (re-)evaluate and why:

* ``"periodic"`` - the paper's global recalculation, spread over rounds: every node is
  re-evaluated once every ``t_cycle`` rounds, on the rounds ``r`` with
  ``r % t_cycle == crc32(str(node)) % t_cycle`` (:func:`periodic_turn`, a hash that is
  stable across processes), so about ``1/t_cycle`` of the nodes each round rather than
  all of them at once: server work per round stays flat instead of spiking every
  ``t_cycle`` rounds. ``t_cycle = 1``: every node every round.
* ``"new"`` - a node never seen before is evaluated and inserted at once.
* ``"returned"`` - a node that left and comes back is re-evaluated (its model may have
  changed while away). Its local-mAP history is remembered, its streak restarts.
* ``"degraded"`` - a node whose local-validation mAP is below ``historical mean -
  delta_down`` for ``patience`` consecutive reports is re-evaluated (only that
  node). The historical mean is over the node's *earlier* reports: the current one
  is compared with it first and joins it afterwards. After a trigger the streak
  restarts at 0, so a node that stays low triggers again every ``patience`` reports
  until its mean has caught up with the new level. A node that does not report a
  local mAP this round keeps its streak unchanged.
* Nodes that were in the graph and are absent now are dropped from the graph.

A node may have several reasons at once (e.g. ``("new", "periodic")``). The graph is
updated from the freshest vector of every present node (``common.graph.update_graph``
recomputes the rows of the nodes evaluated or dropped). The state is a plain JSON-ready
dict (:meth:`GraphMaintenance.state_dict`), so a killed server resumes where it stopped.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

REASONS = ("new", "returned", "periodic", "degraded")
"""Reasons for evaluating a node, in the order they are listed in a plan."""


@dataclass(frozen=True)
class Plan:
    """What one round of graph maintenance does.

    Attributes
    ----------
    round : int
        The round this plan is for.
    reasons : dict node id -> tuple of str
        The nodes to evaluate on the benchmark and why (see :data:`REASONS`).
    dropped : frozenset
        Nodes that were in the graph and are absent this round.
    """

    round: int
    reasons: dict[Hashable, tuple[str, ...]] = field(default_factory=dict)
    dropped: frozenset = frozenset()

    @property
    def evaluate(self) -> frozenset:
        """The nodes to evaluate on the shared benchmark this round."""
        return frozenset(self.reasons)


def periodic_turn(node: Hashable, t_cycle: int) -> int:
    """The node's periodic round modulo ``t_cycle``: ``crc32(str(node)) % t_cycle`` (stable across processes).

    Examples
    --------
    ``crc32(b"a") = 3904355907``: with ``t_cycle = 3`` node ``"a"`` is refreshed on rounds 3, 6, 9, ...
    """
    return zlib.crc32(str(node).encode()) % t_cycle


@dataclass
class _NodeState:
    active: bool = True  # in the graph now
    map_sum: float = 0.0  # sum of past local-validation mAPs
    map_count: int = 0
    streak: int = 0  # consecutive reports below mean - delta_down


class GraphMaintenance:
    """Periodic and event-driven graph updates (paper section 4.3, Figure 4).

    Parameters
    ----------
    t_cycle : int
        Rounds between global recalculations, >= 1 (1: every round).
    delta_down : float
        Drop below the historical mean of the local mAP that counts as degraded, >= 0.
    patience : int
        Consecutive degraded reports that trigger a re-evaluation, >= 1.

    Examples
    --------
    ``t_cycle=3, delta_down=0.05, patience=2``; node "a" (periodic turn 0: rounds 3, 6, ...)
    reports local mAP 0.6, 0.6, 0.5, 0.5, 0.4, 0.4: round 1 evaluates a (new); round 2
    nothing; round 3 is its periodic turn (streak 1: 0.5 < 0.6 - 0.05); round 4 streak 2
    (0.5 < mean(0.6, 0.6, 0.5) - 0.05 = 0.517): degraded, streak back to 0; round 5 streak 1
    (0.4 < 0.55 - 0.05); round 6 periodic and, with streak 2 (0.4 < 0.52 - 0.05), degraded.
    """

    def __init__(self, t_cycle: int, delta_down: float, patience: int) -> None:
        if not (isinstance(t_cycle, int) and t_cycle >= 1):
            raise ValueError(f"t_cycle must be an int >= 1, got {t_cycle!r}")
        if not (math.isfinite(delta_down) and delta_down >= 0):
            raise ValueError(f"delta_down must be a finite number >= 0, got {delta_down!r}")
        if not (isinstance(patience, int) and patience >= 1):
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        self.t_cycle = t_cycle
        self.delta_down = float(delta_down)
        self.patience = patience
        self.last_round: int | None = None
        self._nodes: dict[Hashable, _NodeState] = {}

    def plan(self, round: int, present_nodes: Iterable[Hashable], local_map: Mapping[Hashable, float],
             idle_nodes: Iterable[Hashable] = ()) -> Plan:
        """Decide this round's evaluations and update the state; call once per round.

        Parameters
        ----------
        round : int
            Round number, strictly increasing from call to call.
        present_nodes : iterable of node ids
            The nodes that returned a model this round.
        local_map : mapping node id -> float
            Local-validation mAP of (some of) the present nodes.
        idle_nodes : iterable of node ids
            Nodes still in the federation that were not asked to train this round (a sampled round): their
            model has not changed, so they are neither evaluated nor dropped.
        """
        if self.last_round is not None and round <= self.last_round:
            raise ValueError(f"round must increase: got {round} after {self.last_round}")
        present = list(dict.fromkeys(present_nodes))  # ordered, unique
        present_set = set(present)
        strangers = set(local_map) - present_set
        if strangers:
            raise ValueError(f"local_map names nodes that are not present: {sorted(map(repr, strangers))}")
        bad = {node: value for node, value in local_map.items() if not math.isfinite(value)}
        if bad:
            raise ValueError(f"local_map values must be finite, got {bad}")

        reasons: dict[Hashable, list[str]] = {}
        for node in present:
            state = self._nodes.get(node)
            if state is None:
                state = self._nodes[node] = _NodeState()
                reasons.setdefault(node, []).append("new")
            elif not state.active:
                state.active, state.streak = True, 0
                reasons.setdefault(node, []).append("returned")
            if round % self.t_cycle == periodic_turn(node, self.t_cycle):
                reasons.setdefault(node, []).append("periodic")
            if node in local_map and self._degraded(state, float(local_map[node])):
                reasons.setdefault(node, []).append("degraded")
        kept = present_set | set(idle_nodes)
        dropped = frozenset(node for node, state in self._nodes.items() if state.active and node not in kept)
        for node in dropped:
            self._nodes[node].active = False

        self.last_round = round
        plan = Plan(round=round, reasons={n: tuple(r) for n, r in reasons.items()}, dropped=dropped)
        logger.info("plan: round %s, evaluate %d of %d node(s), dropped %d", round, len(plan.reasons), len(present),
                    len(dropped))
        return plan

    def _degraded(self, state: _NodeState, value: float) -> bool:
        """Update the streak and the history with one report; True when it triggers."""
        if state.map_count and value < state.map_sum / state.map_count - self.delta_down:
            state.streak += 1
        else:
            state.streak = 0
        state.map_sum += value
        state.map_count += 1
        if state.streak >= self.patience:
            state.streak = 0
            return True
        return False

    def state_dict(self) -> dict:
        """The whole state as plain, JSON-serialisable data (node ids must be JSON values)."""
        return {
            "t_cycle": self.t_cycle,
            "delta_down": self.delta_down,
            "patience": self.patience,
            "last_round": self.last_round,
            "nodes": [{"id": node, **vars(state)} for node, state in self._nodes.items()],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping) -> GraphMaintenance:
        """Rebuild a :class:`GraphMaintenance` saved by :meth:`state_dict`."""
        maintenance = cls(state["t_cycle"], state["delta_down"], state["patience"])
        maintenance.last_round = state["last_round"]
        for record in state["nodes"]:
            fields = dict(record)
            node = fields.pop("id")
            maintenance._nodes[node] = _NodeState(**fields)
        return maintenance
