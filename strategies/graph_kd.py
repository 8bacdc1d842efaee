"""Graph-guided distillation strategy (paper section 4.3) on Flower's hooks.

Round ``r``, on top of :class:`PersonalizedStrategy`'s per-site models:

1. ``configure_train`` updates the **graph** from what round ``r - 1`` measured:
   the sparse :func:`common.graph.build_graph` over every site that trains this round
   and has a profile (position, class set, AP vector on the shared benchmark; a site
   that joins this round: the AP vector of the weights it starts from), kept
   between rounds and brought up to date by :func:`common.graph.update_graph`, which
   recomputes only the rows of the sites evaluated, joined or gone since; teacher
   degree (in-strength, by default weighted by benchmark mAP), top-``rho``
   teachers; a student only learns from teachers more accurate than itself
   (``better_only``). Then one message *per node*: a student's carries its own
   weights, a :class:`common.protocol.KDRequest` (teachers, mixing weights from
   :func:`common.graph.teachers_for`, KD settings) and its teachers' models from
   round ``r - 1`` (``teacher-<i>`` records). It trains its usual local epochs with
   ``alpha * detection + (1 - alpha) * KD`` (with ``student_check`` it first drops
   the teachers that do not beat it on its own validation split), so a federation
   with KD and one without train equally long. On ``cloud_rounds`` the cloud model
   (``cloud_fn``) teaches every site too (alone, or for half of the soft labels
   beside a student's edge teachers). ``mode="all"`` is the naive baseline: every
   other site teaches, uniformly.
2. ``aggregate_train`` records which proposed teachers each student kept or
   rejected, then runs **maintenance**: :class:`common.schedule.GraphMaintenance`
   decides which sites to (re-)evaluate on the shared benchmark (periodic, new,
   returned, degraded); ``benchmark_fn`` scores just those and their per-class
   AP50 becomes their profile for the next round's graph. The periodic share is
   spread over rounds (``1/t_cycle`` of the sites each round), so with ``t_cycle > 1``
   server work per round follows what changed, not the number of sites.
   ``aggregation="fedavg"``
   works here as in the base class: students start from the global model, teachers
   are the sites' own models of the round before.

:meth:`state_dict` holds what a resumed server needs besides the weights
(completed round, maintenance state, profiles).
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any, Callable, Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import graph as G
from common import protocol as P
from common.schedule import GraphMaintenance
from strategies.personalized import NodeReply, PersonalizedStrategy, brief

CloudFn = Callable[[int], tuple[ArrayRecord, str]]  # round -> (cloud weights, cloud arch)


class GraphKDStrategy(PersonalizedStrategy):
    def __init__(self, *, mode: str = "graph", rho: float = 0.3, teacher_rank: str = "map_degree",
                 teacher_scope: str = "global",
                 better_only: bool = True, sigma_s_km: float = 5.0, min_weight: float = 0.0,
                 class_weights: list[float] | None = None, alpha: float = 0.5, temperature: float = 1.0,
                 fg_threshold: float = 0.25, select: str = "teacher-better", cloud_select: str = "teacher-fg",
                 student_check: bool = True,
                 check_margin: float = 0.05,
                 start_round: int = 1,
                 cloud_rounds: tuple[int, ...] = (), cloud_fn: CloudFn | None = None, edge_arch: str = "yolo11n",
                 t_cycle: int = 1, delta_down: float = 0.05, patience: int = 2, top_k: int = 32,
                 cutoff_sigmas: float = 4.0, renorm_tol: float = 0.02, new_node_init: str = "teacher", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("none", "graph", "all"):
            raise ValueError(f"mode={mode!r}: expected 'none', 'graph' or 'all'")
        if cloud_rounds and cloud_fn is None:
            raise ValueError("cloud_rounds given but no cloud_fn to provide the cloud model")
        if teacher_rank not in ("map_degree", "degree"):
            raise ValueError(f"teacher_rank={teacher_rank!r}: expected 'map_degree' or 'degree'")
        if teacher_scope not in ("global", "local"):
            raise ValueError(f"teacher_scope={teacher_scope!r}: expected 'global' or 'local'")
        if new_node_init not in ("base", "teacher"):
            raise ValueError(f"new_node_init={new_node_init!r}: expected 'base' or 'teacher'")
        self.teacher_scope, self.new_node_init = teacher_scope, new_node_init
        self.mode, self.rho, self.sigma_s_km, self.min_weight = mode, rho, sigma_s_km, min_weight
        self.teacher_rank, self.better_only = teacher_rank, better_only
        self.class_weights = class_weights
        self.top_k, self.cutoff_sigmas, self.renorm_tol = top_k, cutoff_sigmas, renorm_tol
        self.graph: G.CollabGraph | None = None  # kept between rounds; rows of changed sites are recomputed
        self.stale: set[str] = set()  # sites whose profile changed since the graph was last brought up to date
        self.kd = dict(alpha=float(alpha), temperature=float(temperature), fg_threshold=float(fg_threshold),
                       student_check=bool(student_check), check_margin=float(check_margin), select=str(select))
        self.cloud_select = str(cloud_select)
        for value in (select, cloud_select):
            if value not in P.KD_SELECTIONS:
                raise ValueError(f"select={value!r}: expected one of {P.KD_SELECTIONS}")
        self.start_round = start_round
        self.cloud_rounds, self.cloud_fn, self.edge_arch = set(cloud_rounds), cloud_fn, edge_arch
        self.maintenance = GraphMaintenance(t_cycle, delta_down, patience)
        self.profiles: dict[str, dict[str, Any]] = {}  # site -> {"position", "classes", "ap", "round"}
        self.graph_record: dict[str, Any] | None = None  # this round's graph, JSON-ready
        self.plan: dict[str, dict[str, float]] = {}  # this round's {student: {teacher: weight}}, as sent
        self._start_ap: list[float] | None = None  # the starting weights' AP vector (joining sites' profile)

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t├── teachers ranked by %s%s", self.teacher_rank,
            ", only more accurate teachers" if self.better_only else "")
        log(INFO, "\t├── KD mode %s, rho %s, sigma_s %s km, T %s, alpha %s", self.mode, self.rho,
            self.sigma_s_km, self.kd["temperature"], self.kd["alpha"])
        log(INFO, "\t└── cloud->edge KD rounds: %s", sorted(self.cloud_rounds) or "none")

    # ------------------------------------------------------------ evaluation
    def sites_to_evaluate(self, server_round: int, replies: list[NodeReply]) -> dict[str, tuple[str, ...]]:
        """The maintenance plan: ``{site: reasons}`` (new, returned, periodic, degraded); drops absent sites (a site
        that ``fraction_train`` left out this round is idle: kept, its unchanged model not scored).

        Evaluation sharding: the server scores the named sites itself, each on the same
        shared benchmark of fixed size (``benchmark_fn``), so the per-round cost is
        (sites named) x (one fixed-size evaluation). The alternative, each site scoring
        itself and returning only its AP vector, would move that cost to the sites but
        make the graph trust self-reported numbers: a site could claim a high AP and be
        picked as everyone's teacher. Server-side scoring trusts no site's report; its
        price is one evaluation per named site on the server.
        """
        local_map = {r.site_id: r.metrics[P.VAL_MAP50] for r in replies}
        idle = sorted({self.site_of[n] for n in self.eligible if n not in self._sent and n in self.site_of})
        plan = self.maintenance.plan(server_round, sorted(local_map), local_map, idle)
        for site_id in plan.dropped:
            self.profiles.pop(site_id, None)
        new = sorted(s for s, reasons in plan.reasons.items() if "new" in reasons)
        if new and server_round > 1:
            log(INFO, "maintenance: round %s: %s is NEW (first reply): evaluated and added to the graph",
                server_round, brief(new))
        log(INFO, "maintenance: round %s evaluates %s of %s sites%s%s", server_round, len(plan.reasons),
            len(local_map), f": {brief(f'{s} {list(r)}' for s, r in sorted(plan.reasons.items()))}"
            if plan.reasons else "", f", dropped {brief(sorted(plan.dropped))}" if plan.dropped else "")
        return dict(plan.reasons)

    def on_evaluated(self, server_round: int, reply: NodeReply) -> None:
        self.profiles[reply.site_id] = {"position": reply.site[P.POSITION_KM], "classes": reply.site[P.CLASSES],
                                        "ap": reply.benchmark["ap50"], "round": server_round,
                                        "reasons": list(reply.evaluated)}
        self.stale.add(reply.site_id)

    def joining_profiles(self, server_round: int, present: list[str], arrays: ArrayRecord | None) -> None:
        """Give each site that trains for the first time a profile from the weights it starts from.

        A joining site has no benchmark profile yet: it is scored only after its first round. It starts from
        ``arrays`` (the base model, or fedavg's global model), so until then its profile is its identity
        (position, classes) with the AP vector of those weights, scored once. It then gets its teachers in its
        first round, which is what the new-node rule is for (section 4.3: a new model "quickly integrates and
        absorbs existing knowledge"). Its own profile replaces this one after the round.
        """
        if self.mode != "graph" or server_round < self.start_round or self.benchmark_fn is None \
                or arrays is None or not len(arrays):
            return
        joining = [s for s in present if s not in self.profiles and s not in self.arrays and s in self.sites]
        if not joining:
            return
        if self._start_ap is None:
            try:
                self._start_ap = list(self.benchmark_fn(arrays)["ap50"])
            except Exception as err:  # noqa: BLE001  (the site then waits for its own profile, as without this)
                log(WARNING, "configure_train: round %s: cannot score the starting weights: %s", server_round, err)
                return
        for site_id in joining:
            site = self.sites[site_id]
            self.profiles[site_id] = {"position": site[P.POSITION_KM], "classes": site[P.CLASSES],
                                      "ap": self._start_ap, "round": server_round, "reasons": ["joining"]}
            self.stale.add(site_id)
        log(INFO, "graph: round %s: %s join with the starting weights' profile", server_round, brief(joining))

    # ----------------------------------------------------------------- graph
    def teacher_plan(self, server_round: int, present: list[str]) -> dict[str, dict[str, float]]:
        """``{student site: {teacher site: weight}}`` for this round (empty: no KD).

        On a cloud round the cloud model teaches every site; a site that also has edge
        teachers this round takes half its soft labels from the cloud and half from them.
        """
        plan = self.edge_plan(server_round, present)
        if server_round not in self.cloud_rounds:
            return plan
        return {s: {"cloud": 0.5, **{t: w / 2 for t, w in plan[s].items()}} if plan.get(s) else {"cloud": 1.0}
                for s in present}

    def edge_plan(self, server_round: int, present: list[str]) -> dict[str, dict[str, float]]:
        """Edge teachers per student: the graph's (``mode="graph"``) or every other site's (``"all"``)."""
        if self.mode == "none" or server_round < self.start_round:
            return {}
        sites = [s for s in present if s in self.profiles]
        if self.mode == "all":
            plan = {s: {t: 1.0 / (len(sites) - 1) for t in sites if t != s} for s in sites if len(sites) > 1}
            self.graph_record = {"round": server_round, "mode": "all", "teachers_for": plan}
            return plan
        graph = self.current_graph(sites)
        degree = G.teacher_degree(graph)
        score = G.accuracy_weighted_degree(graph, degree) if self.teacher_rank == "map_degree" else degree
        # a joining site has no model of its own to send yet: it learns this round and teaches nobody (score 0:
        # below every positive score, so no local neighbour learns from it and no global top set takes it)
        joining = {s for s in sites if self.profiles[s].get("reasons") == ["joining"]}
        rules = [self.better_only, False] if self.better_only and joining else [self.better_only]
        score = {s: 0.0 if s in joining else v for s, v in score.items()}
        if self.teacher_scope == "local":  # every site learns from the neighbours ranked above it
            plans = [G.local_plan(graph, score, better) for better in rules]
        else:  # a student with no teacher neighbour sits out
            teachers = G.select_teachers(score, self.rho)
            plans = [G.teacher_plan(graph, teachers, better) for better in rules]
        # better_only compares benchmark mAP50, which for a joining site is the starting weights' score on the
        # public data they were trained on, not on its task: it takes every neighbour ranked above it, and its
        # own check on its validation split (student_check) keeps those that help
        plan = {s: ts for s, ts in plans[0].items() if s not in joining}
        plan.update({s: ts for s, ts in plans[-1].items() if s in joining and ts})
        if self.teacher_scope == "local":
            teachers = {t for ts in plan.values() for t in ts}
        self.graph_record = {"round": server_round, "mode": "graph", **G.graph_to_json(graph, teachers, degree),
                             "teacher_rank": self.teacher_rank, "teacher_scope": self.teacher_scope, "score": score,
                             "teachers_for": plan, "rows_computed": graph.rows_computed}
        log(INFO, "graph: round %s, %s sites, %s arcs, %s rows computed, teachers %s, students %s", server_round,
            len(graph), graph.num_arcs, graph.rows_computed, brief(sorted(teachers)), brief(sorted(plan)))
        return plan

    def current_graph(self, sites: list[str]) -> G.CollabGraph:
        """The graph over ``sites``: built once, then updated in the rows of the sites changed, new or gone."""
        if self.graph is None:
            self.graph = G.build_graph({s: self.profiles[s] for s in sites}, self.sigma_s_km,
                                       class_weights=self.class_weights, min_weight=self.min_weight,
                                       cutoff_sigmas=self.cutoff_sigmas, top_k=self.top_k)
        else:
            wanted = set(sites)
            changed = sorted((self.stale & wanted) | (wanted - set(self.graph.nodes)))
            removed = [s for s in self.graph.nodes if s not in wanted]
            if changed or removed:
                self.graph = G.update_graph(self.graph, {s: self.profiles[s] for s in changed}, removed,
                                            self.renorm_tol)
            else:
                self.graph.rows_computed = 0
        self.stale.clear()
        return self.graph

    # -------------------------------------------------------------------- kd
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The base class's messages; a student's also carries its KDRequest and its teachers' weights."""
        self.graph_record, self.plan = None, {}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        # the graph spans every site that may train this round; the students are those that do (fraction_train)
        present = sorted({self.site_of[n] for n in self.eligible if n in self.site_of}) if messages else []
        students = {self.site_of.get(m.metadata.dst_node_id) for m in messages}
        self.joining_profiles(server_round, present, arrays)
        plan = self.teacher_plan(server_round, present) if messages else {}
        plan = {s: ts for s, ts in plan.items() if s in students}
        if self.graph_record is not None:
            self.graph_record["teachers_for"] = {s: ts for s, ts in self.graph_record["teachers_for"].items()
                                                 if s in students}
        cloud = self.cloud_fn(server_round) if any("cloud" in t for t in plan.values()) else None
        for msg in messages:
            student = self.site_of.get(msg.metadata.dst_node_id)
            teachers = plan.get(student)
            if not teachers or P.ARRAYS not in msg.content:
                continue
            ids = sorted(teachers)
            if any(t != "cloud" and t not in self.arrays for t in ids):
                log(WARNING, "configure_train: round %s: a teacher of %s has no weights; it trains without",
                    server_round, student)
                continue
            kd = P.KDRequest(tuple(ids), tuple(float(teachers[t]) for t in ids),
                             tuple(cloud[1] if t == "cloud" else self.edge_arch for t in ids),
                             **{**self.kd, **({"select": self.cloud_select} if "cloud" in ids else {})})
            msg.content[P.CONFIG].update(kd.encode())
            self.joining_start(server_round, student, teachers, msg)
            for i, t in enumerate(ids):
                msg.content[P.teacher_record(i)] = cloud[0] if t == "cloud" else self.arrays[t]
            self.plan[student] = dict(teachers)
        if self.plan:
            log(INFO, "configure_train: round %s, KD for %s students: %s", server_round, len(self.plan),
                brief(f"{s} <- {sorted(t)}" for s, t in sorted(self.plan.items())))
        return messages

    def joining_start(self, server_round: int, student: str, teachers: Mapping[str, float], msg: Message) -> None:
        """With ``new_node_init="teacher"`` a joining site starts from its top edge teacher's model (largest graph
        weight; ties by name) instead of the base model: warm-started from the neighbour most like it, it distils
        from the rest. Its own check then finds that teacher no better than its start, and drops it."""
        if self.new_node_init != "teacher" or self.profiles.get(student, {}).get("reasons") != ["joining"]:
            return
        edge = [t for t in teachers if t != "cloud"]
        if edge:
            best = max(edge, key=lambda t: (teachers[t], t))
            msg.content[P.ARRAYS] = self.arrays[best]
            log(INFO, "configure_train: round %s: %s joins from %s's model (kd.new-node-init=teacher)",
                server_round, student, best)

    def on_reply(self, server_round: int, reply: NodeReply) -> None:
        """A student's reply: which proposed teachers its own check kept and which it rejected."""
        proposed = self.plan.get(reply.site_id)
        if not proposed:
            return
        ids = sorted(proposed)
        kept = reply.metrics.get(P.TEACHERS_KEPT, [1.0] * len(ids))
        if len(kept) != len(ids):
            raise P.ProtocolError(f"metrics: '{P.TEACHERS_KEPT}'={kept!r} must have one entry per teacher {ids}")
        reply.metrics["teachers_proposed"] = proposed
        reply.metrics["teachers"] = {t: proposed[t] for t, k in zip(ids, kept) if k}
        reply.metrics["teachers_rejected"] = sorted(t for t, k in zip(ids, kept) if not k)
        if reply.metrics["teachers"]:
            reply.phase = "kd"

    def round_graph(self, server_round: int) -> dict[str, Any] | None:
        return self.graph_record

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        return {"completed_round": self.completed_round, "maintenance": self.maintenance.state_dict(),
                "profiles": self.profiles, "sites": self.sites}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.completed_round = int(state["completed_round"])
        self.maintenance = GraphMaintenance.from_state_dict(state["maintenance"])
        self.profiles = dict(state["profiles"])
        self.graph, self.stale = None, set()
        self.sites = dict(state.get("sites", {}))
