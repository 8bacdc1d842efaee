"""Collaboration graph for graph-guided distillation among edge models (paper section 4.3).

Every edge model is a node. Its performance on the shared benchmark is the vector
``V = [mAP, AP_1, ..., AP_n]``; the vectors are z-scored per column across the models,
and two models are the more alike the smaller their weighted Euclidean distance. The
arc weight between nodes i and j is the product of three affinities (spatial
proximity, task relevance, model similarity), normalised over i's neighbourhood.
High-degree nodes teach, the others learn.

Where the paper is unclear or wrong, this module decides as follows.

* **Missing classes (NaN AP).** A class absent from the benchmark has no AP; it comes
  in as NaN. A model's mAP is the mean over its present classes (``nanmean``). In
  :func:`build_graph` a column that is NaN for *any* model gets weight 0 in every
  distance, so all pairs are compared on the same columns; pairwise dropping would
  make distances over fewer columns look smaller.
* **Normalisation.** z-score with the population standard deviation (``ddof=0``):
  the M models are the whole population, not a sample. A column whose spread is
  below ``1e-12`` (all models equal) becomes 0 rather than 0/0.
* **Small-object weights.** The paper's ``w_k = N_k / N_k`` is garbled. We read it as
  the share ``s_k = N_k^small / N_k`` of class-k benchmark instances below the
  small-size threshold and use ``w_k ∝ 1 + s_k``, normalised to mean 1 over the
  classes (:func:`small_object_class_weights`). The ``1 +`` keeps classes without
  small instances in the distance (the literal share would give them weight 0);
  an all-small class weighs twice an all-large one. The mAP column always weighs 1.
* **Degree.** The paper sets ``d_i = sum_j a_ij``. Since ``a_ij`` is normalised over
  i's own neighbourhood, that sum is 1 for every node with a neighbour and cannot
  rank anything. :func:`teacher_degree` uses the in-strength ``d_i = sum_j a_ji``:
  how strongly the other nodes lean on i.
* **Teacher count.** ``ceil(rho * M)`` (a tolerance of 1e-9 absorbs float noise, so
  ``rho=0.3, M=10`` gives 3), at least 1 when ``rho > 0`` and at most ``M - 1`` so
  that a student remains. A node with degree 0 is never a teacher (nobody leans on
  it), so fewer teachers come back when fewer nodes have a positive degree.
  Ties are broken by ascending node id, so node ids must be mutually comparable.
* **Accuracy (our addition).** Nothing in the paper's degree ranks by accuracy: in our
  first KD measurement (``benchmarks/results/kd_federation_probe.md``) the in-strength
  picked the two *weakest* sites as teachers every round (close to each other and to
  the benchmark-wide mean in AP space, so the others "lean on" them most), and
  distilling the strong sites towards them cost 0.15 mAP50 each. So by default
  (``kd.teacher_rank = map_degree``) teachers are ranked by
  :func:`accuracy_weighted_degree` ``d_i * mAP_i`` (benchmark mAP, the first entry
  of V before normalisation), and :func:`teachers_for` with ``better_only`` keeps only
  teachers whose benchmark mAP is strictly above the student's: a model never learns
  from one that scores lower on the shared benchmark. ``teacher_rank = degree`` and
  ``better_only = False`` give the paper's rule.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import networkx as nx
import numpy as np

logger = logging.getLogger(__name__)

EARTH_RADIUS_KM = 6371.0088
"""Mean Earth radius (IUGG), used by :func:`latlon_to_km`."""

_ZERO_SPREAD = 1e-12
_COUNT_TOLERANCE = 1e-9


def performance_vector(ap_per_class: Iterable[float]) -> np.ndarray:
    """Performance characterisation vector ``V = [mAP, AP_1, ..., AP_n]`` (paper section 4.3).

    ``mAP = nanmean(AP_k)``: classes absent from the benchmark come in as NaN and
    neither count in the mean nor are replaced (they stay NaN in the vector).

    Parameters
    ----------
    ap_per_class : iterable of float
        Per-class AP (e.g. AP50) in [0, 1]; NaN for a class with no benchmark instance.

    Returns
    -------
    np.ndarray
        Shape ``(n + 1,)``.

    Raises
    ------
    ValueError
        Empty input, no finite AP at all, an infinite AP, or an AP outside [0, 1].

    Examples
    --------
    ``[0.2, 0.4, nan]`` -> mAP = (0.2 + 0.4) / 2 = 0.3 -> ``[0.3, 0.2, 0.4, nan]``.
    """
    ap = np.asarray(list(ap_per_class), dtype=float)
    if ap.ndim != 1 or ap.size == 0:
        raise ValueError(f"ap_per_class must be a non-empty 1-D sequence, got shape {ap.shape}")
    present = ~np.isnan(ap)
    if not present.any():
        raise ValueError("ap_per_class has no finite AP (all NaN)")
    bad = present & ~((ap >= 0.0) & (ap <= 1.0))
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(f"AP of class {k} is {ap[k]!r}, expected a value in [0, 1] or NaN")
    return np.concatenate([[ap[present].mean()], ap])


def normalize_vectors(vectors: np.ndarray) -> np.ndarray:
    """z-score each column across the M models (paper section 4.3, ``(AP_i - mu_i) / sigma_i``).

    ``mu`` and ``sigma`` are the mean and the population standard deviation
    (``ddof=0``) of the column's present (non-NaN) entries. A column with zero spread
    (``sigma < 1e-12``) becomes 0; a NaN entry stays NaN.

    Parameters
    ----------
    vectors : np.ndarray
        Shape ``(M, n + 1)``, one performance vector per row.

    Returns
    -------
    np.ndarray
        Shape ``(M, n + 1)``.

    Examples
    --------
    Column ``[0.2, 0.4]``: mu = 0.3, sigma = 0.1 -> ``[-1, 1]``; column ``[0.5, 0.5]`` -> ``[0, 0]``.
    """
    v = np.asarray(vectors, dtype=float)
    if v.ndim != 2:
        raise ValueError(f"vectors must be 2-D (models, columns), got shape {v.shape}")
    present = ~np.isnan(v)
    count = np.maximum(present.sum(axis=0), 1)
    mean = np.where(present, v, 0.0).sum(axis=0) / count
    dev = np.where(present, v - mean, 0.0)
    std = np.sqrt((dev**2).sum(axis=0) / count)
    spread = std >= _ZERO_SPREAD
    z = np.where(spread, dev / np.where(spread, std, 1.0), 0.0)
    return np.where(present, z, np.nan)


def weighted_distance(v_i: np.ndarray, v_j: np.ndarray, w: np.ndarray | None = None) -> float:
    """Weighted Euclidean distance ``sqrt(sum_k w_k (v_ik - v_jk)^2)`` (paper section 4.3, D_weighted).

    A column with ``w_k = 0`` is ignored even when it holds NaN; a NaN in a column
    with positive weight is an error.

    Parameters
    ----------
    v_i, v_j : np.ndarray
        Shape ``(n + 1,)``.
    w : np.ndarray, optional
        Non-negative column weights, shape ``(n + 1,)``; all ones by default.

    Examples
    --------
    ``v_i = [0, 0], v_j = [3, 4]`` -> 5; with ``w = [1, 0.25]`` -> sqrt(9 + 0.25 * 16) = sqrt(13).
    """
    a = np.asarray(v_i, dtype=float)
    b = np.asarray(v_j, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"v_i and v_j must be 1-D of equal length, got {a.shape} and {b.shape}")
    w = np.ones_like(a) if w is None else np.asarray(w, dtype=float)
    if w.shape != a.shape:
        raise ValueError(f"w has shape {w.shape}, expected {a.shape}")
    if not np.all(np.isfinite(w) & (w >= 0)):
        raise ValueError(f"w must be finite and non-negative, got {w.tolist()}")
    used = w > 0
    diff = a[used] - b[used]
    if np.isnan(diff).any():
        k = int(np.flatnonzero(used)[np.isnan(diff)][0])
        raise ValueError(f"column {k} is NaN but has weight {w[k]}; give it weight 0 to skip it")
    return float(np.sqrt(np.sum(w[used] * diff**2)))


def small_object_class_weights(small_counts: Iterable[float], total_counts: Iterable[float]) -> np.ndarray:
    """Per-class distance weights that grow with the share of small instances (paper section 4.3, w_k).

    ``s_k = small_k / total_k`` (0 for a class with no instance), ``w_k = (1 + s_k) / mean_j(1 + s_j)``,
    so the weights average 1. Prepend weight 1 for the mAP column to use them in
    :func:`weighted_distance` (:func:`build_graph` does this).

    Parameters
    ----------
    small_counts, total_counts : iterable of float
        Per-class benchmark instance counts below the small-size threshold and in all.

    Returns
    -------
    np.ndarray
        Shape ``(n,)``.

    Examples
    --------
    small = [0, 5, 10], total = [10, 10, 10] -> s = [0, 0.5, 1] -> 1 + s = [1, 1.5, 2],
    mean 1.5 -> ``[2/3, 1, 4/3]``.
    """
    small = np.asarray(list(small_counts), dtype=float)
    total = np.asarray(list(total_counts), dtype=float)
    if small.ndim != 1 or small.shape != total.shape or small.size == 0:
        raise ValueError(
            f"small_counts and total_counts must be non-empty and of equal length, got {small.shape} and {total.shape}"
        )
    if not np.all(np.isfinite(total) & (small >= 0) & (small <= total)):
        raise ValueError(f"need 0 <= small_counts <= total_counts, got {small.tolist()} and {total.tolist()}")
    share = np.divide(small, total, out=np.zeros_like(small), where=total > 0)
    raw = 1.0 + share
    return raw / raw.mean()


def latlon_to_km(lat: float, lon: float, lat0: float, lon0: float) -> np.ndarray:
    """Project degrees latitude/longitude onto a local plane in km around ``(lat0, lon0)``.

    Equirectangular projection: ``x = R * rad(lon - lon0) * cos(rad(lat0))``,
    ``y = R * rad(lat - lat0)``, R = 6371.0088 km. Accurate to well under 1 % within a
    few hundred km of the origin, which is what the spatial affinity needs.

    Returns
    -------
    np.ndarray
        ``[x, y]`` in km (shape ``(..., 2)`` for array inputs).

    Examples
    --------
    ``(0, 1)`` around ``(0, 0)`` -> ``[111.195, 0]``; the same step east at ``lat0 = 60``
    is half as long: ``[55.597, 0]``.
    """
    lat, lon = np.asarray(lat, dtype=float), np.asarray(lon, dtype=float)
    for name, value in (("lat", lat), ("lat0", np.asarray(lat0, dtype=float))):
        if not np.all(np.abs(value) <= 90.0):
            raise ValueError(f"{name} must be within [-90, 90] degrees, got {value.tolist()}")
    x = EARTH_RADIUS_KM * np.radians(lon - lon0) * math.cos(math.radians(lat0))
    y = EARTH_RADIUS_KM * np.radians(lat - lat0)
    return np.stack([x, y], axis=-1)


def spatial_affinity(p_i: Iterable[float], p_j: Iterable[float], sigma_s: float) -> float:
    """Spatial proximity ``a_s = exp(-||p_i - p_j||^2 / (2 sigma_s^2))`` (paper section 4.3, eq. (1)).

    Positions are in km on a local plane (see :func:`latlon_to_km`), ``sigma_s`` in km.

    Examples
    --------
    ``p_i = (0, 0), p_j = (3, 4), sigma_s = 5`` -> exp(-25 / 50) = exp(-0.5) = 0.60653.
    """
    _check_sigma(sigma_s)
    d2 = float(np.sum((np.asarray(p_i, dtype=float) - np.asarray(p_j, dtype=float)) ** 2))
    return math.exp(-d2 / (2.0 * sigma_s**2))


def task_relevance(classes_i: Iterable[int], classes_j: Iterable[int]) -> float:
    """Task relevance ``a_t = |C_i ∩ C_j| / max(|C_i|, |C_j|)`` (paper section 4.3, eq. (2)); 0 if both empty.

    Examples
    --------
    ``C_i = {1, 2, 3}, C_j = {2, 3}`` -> 2 / 3.
    """
    c_i, c_j = set(classes_i), set(classes_j)
    larger = max(len(c_i), len(c_j))
    return len(c_i & c_j) / larger if larger else 0.0


def model_affinity(distance: float) -> float:
    """Model-feature similarity ``a_f = 1 / (1 + D_weighted)`` (paper section 4.3, eq. (3)).

    Examples
    --------
    D = 0 -> 1; D = 1 -> 0.5.
    """
    if not distance >= 0:
        raise ValueError(f"distance must be >= 0, got {distance!r}")
    return 1.0 / (1.0 + distance)


def build_graph(
    profiles: Mapping[Hashable, Any],
    sigma_s: float,
    class_weights: Iterable[float] | None = None,
    min_weight: float = 0.0,
) -> nx.DiGraph:
    """Collaboration graph of the edge models (paper section 4.3).

    For nodes i != j: ``raw_ij = a_s * a_t * a_f`` (symmetric); the arc i -> j exists
    when ``raw_ij > min_weight`` and carries ``weight = raw_ij / sum_k raw_ik`` over
    i's out-arcs (the paper's one-hop normalisation; out-weights of a node sum to 1).
    The graph is directed because that normalisation is per source node.

    Parameters
    ----------
    profiles : mapping node id -> profile
        Each profile (a dict or an object with these attributes) gives ``position``
        (2 floats, km on a local plane), ``classes`` (iterable of int class ids the
        node's model detects) and ``ap`` (per-class AP on the shared benchmark, NaN
        for a class absent there; the same length for every node).
    sigma_s : float
        Spatial scale in km, > 0.
    class_weights : iterable of float, optional
        Per-class distance weights, shape ``(n,)`` (e.g. :func:`small_object_class_weights`
        or from config); the mAP column always gets weight 1. All ones by default.
        A column NaN for any model gets weight 0 (see the module docstring).
    min_weight : float
        Arcs with ``raw <= min_weight`` are left out; 0 drops only zero-affinity pairs
        (e.g. no shared class). A node whose arcs are all cut is isolated.

    Returns
    -------
    nx.DiGraph
        Nodes carry ``position`` (tuple), ``classes`` (sorted tuple), ``vector``
        (normalised V) and ``raw_vector`` (V); arcs carry ``raw``, ``a_s``, ``a_t``,
        ``a_f``, ``distance`` and ``weight``; ``graph.graph["column_weights"]`` holds
        the effective distance weights.

    Examples
    --------
    A at (0, 0) with classes {0, 1} and AP [0.2, 0.6]; B at (3, 4) with classes {1}
    and AP [0.4, 0.4]; sigma_s = 5. V_A = [0.4, 0.2, 0.6], V_B = [0.4, 0.4, 0.4] ->
    normalised [0, -1, 1] and [0, 1, -1] -> D = sqrt(8). a_s = exp(-0.5) = 0.60653,
    a_t = 1/2, a_f = 1 / (1 + sqrt 8) = 0.26120 -> raw = 0.079214; each node has one
    out-arc, so both weights are 1.
    """
    _check_sigma(sigma_s)
    if not min_weight >= 0:
        raise ValueError(f"min_weight must be >= 0, got {min_weight!r}")
    nodes = list(profiles)
    if not nodes:
        return nx.DiGraph(column_weights=[])
    fields = {node: _profile_fields(node, profiles[node]) for node in nodes}
    lengths = {node: fields[node][2].size - 1 for node in nodes}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"AP vectors differ in length (classes per node): {lengths}")
    raw_vectors = np.array([fields[node][2] for node in nodes])  # (M, n + 1)
    n_classes = raw_vectors.shape[1] - 1
    per_class = np.ones(n_classes) if class_weights is None else np.asarray(list(class_weights), dtype=float)
    if per_class.shape != (n_classes,):
        raise ValueError(f"class_weights has {per_class.size} entries, expected one per class ({n_classes})")
    if not np.all(np.isfinite(per_class) & (per_class >= 0)):
        raise ValueError(f"class_weights must be finite and non-negative, got {per_class.tolist()}")
    column_weights = np.concatenate([[1.0], per_class])
    column_weights[np.isnan(raw_vectors).any(axis=0)] = 0.0
    vectors = normalize_vectors(raw_vectors)

    graph = nx.DiGraph(column_weights=column_weights.tolist())
    for idx, node in enumerate(nodes):
        position, classes, _ = fields[node]
        graph.add_node(node, position=position, classes=classes, vector=vectors[idx], raw_vector=raw_vectors[idx])
    for a in range(len(nodes)):
        for b in range(a + 1, len(nodes)):
            i, j = nodes[a], nodes[b]
            distance = weighted_distance(vectors[a], vectors[b], column_weights)
            attrs = {
                "a_s": spatial_affinity(fields[i][0], fields[j][0], sigma_s),
                "a_t": task_relevance(fields[i][1], fields[j][1]),
                "a_f": model_affinity(distance),
                "distance": distance,
            }
            attrs["raw"] = attrs["a_s"] * attrs["a_t"] * attrs["a_f"]
            if attrs["raw"] > min_weight:
                graph.add_edge(i, j, **attrs)
                graph.add_edge(j, i, **attrs)
    for i in nodes:
        total = sum(raw for _, _, raw in graph.out_edges(i, data="raw"))
        for _, _, data in graph.out_edges(i, data=True):
            data["weight"] = data["raw"] / total
    logger.debug("build_graph: %d nodes, %d arcs", graph.number_of_nodes(), graph.number_of_edges())
    return graph


def teacher_degree(graph: nx.DiGraph) -> dict[Hashable, float]:
    """Teaching qualification ``d_i = sum_j a_ji``: the in-strength of normalised weights (paper section 4.3).

    The paper writes ``d_i = sum_j a_ij``; with ``a_ij`` normalised over i's own
    neighbourhood that out-strength is 1 for every node with a neighbour, so it cannot
    rank teachers. The in-strength measures how strongly the other nodes lean on i.
    An isolated node has degree 0.

    Examples
    --------
    Arcs A->B 0.8, A->C 0.2, B->A 1, C->A 1 -> d_A = 2, d_B = 0.8, d_C = 0.2
    (the out-strengths are 1, 1, 1).
    """
    return {node: float(sum(w for _, _, w in graph.in_edges(node, data="weight"))) for node in graph.nodes}


def accuracy_weighted_degree(graph: nx.DiGraph, degree: Mapping[Hashable, float] | None = None) -> dict[Hashable, float]:
    """Teacher score ``d_i * mAP_i``: in-strength weighted by benchmark mAP (our addition, see the module docstring).

    ``mAP_i`` is the node's benchmark mAP (``raw_vector[0]``, the mean of its present
    classes' AP); a node without any AP (NaN) scores 0 and never teaches.

    Examples
    --------
    In-strengths {A: 2, B: 0.8, C: 0.2} and mAPs {A: 0.1, B: 0.5, C: 0.4} ->
    {A: 0.2, B: 0.4, C: 0.08}: B, less central but five times as accurate, ranks first.
    """
    degree = teacher_degree(graph) if degree is None else degree
    return {node: float(degree.get(node, 0.0)) * _benchmark_map(graph, node) for node in graph.nodes}


def select_teachers(degree: Mapping[Hashable, float], rho: float) -> set:
    """Teacher set T: the top-``rho`` fraction of nodes by degree (paper section 4.3).

    ``count = min(max(ceil(rho * M - 1e-9), 1), M - 1)`` for ``rho > 0`` and M >= 2, and 0
    otherwise: at least one teacher, at least one student. Only nodes with a positive
    degree qualify (a node nobody leans on could teach nobody), so fewer may come
    back. Ties go to the smaller node id.

    Parameters
    ----------
    degree : mapping node id -> float
        E.g. :func:`teacher_degree`; finite and non-negative.
    rho : float
        Fraction in [0, 1].

    Examples
    --------
    degrees {a: 2, b: 1, c: 1, d: 0.5}, rho = 0.5 -> ceil(2) = 2 teachers -> {a, b}
    (b beats c on id); rho = 1.0 -> M - 1 = 3 -> {a, b, c}.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be within [0, 1], got {rho!r}")
    bad = {node: d for node, d in degree.items() if not (math.isfinite(d) and d >= 0)}
    if bad:
        raise ValueError(f"degrees must be finite and non-negative, got {bad}")
    m = len(degree)
    if m < 2 or rho == 0.0:
        return set()
    count = min(max(math.ceil(rho * m - _COUNT_TOLERANCE), 1), m - 1)
    ranked = sorted((node for node, d in degree.items() if d > 0), key=lambda node: (-degree[node], node))
    return set(ranked[:count])


def teachers_for(graph: nx.DiGraph, student: Hashable, teachers: Iterable[Hashable],
                 better_only: bool = False) -> dict[Hashable, float]:
    """The student's teachers and their mixing weights (paper section 4.3: "if its neighbor j is in T").

    ``w_j = a_ij / sum_{k in N(i) ∩ T} a_ik`` over the student's out-neighbours that are
    teachers (never the student itself); the weights sum to 1. A student without a
    teacher neighbour gets ``{}`` and trains without KD this round. In the paper only
    nodes outside T are students; the caller asks for those. With ``better_only`` a
    teacher whose benchmark mAP is not strictly above the student's is left out
    (our addition, see the module docstring).

    Examples
    --------
    Student S with arcs S->A 0.5, S->B 0.3, S->C 0.2 and T = {A, B} -> {A: 0.625, B: 0.375}.
    """
    if student not in graph:
        raise ValueError(f"student {student!r} is not a node of the graph")
    teacher_set = set(teachers)
    if better_only:
        floor = _benchmark_map(graph, student)
        teacher_set = {t for t in teacher_set if t in graph and _benchmark_map(graph, t) > floor}
    arcs = {j: w for _, j, w in graph.out_edges(student, data="weight") if j in teacher_set and j != student}
    total = sum(arcs.values())
    return {j: w / total for j, w in arcs.items()}


def local_plan(graph: nx.DiGraph, score: Mapping[Hashable, float],
               better_only: bool = False) -> dict[Hashable, dict[Hashable, float]]:
    """Every node learns from its neighbours that rank above it (``teacher_scope="local"``).

    The paper picks one global teacher set, the top-``rho`` by degree, and only nodes
    outside it learn. When the sites form groups of similar ones, a global top set can
    fall inside one group and leave the others without a relevant teacher. The local
    reading of "higher models are distilled towards lower models" (section 4.3) gives
    each node ``teachers_for(graph, i, {j : score_j > score_i})``: every arc i -> j whose
    head outranks its tail carries knowledge, weighted as ``teachers_for`` weighs it.
    The top-ranked node (and any node nobody outranks) learns from nobody.

    Examples
    --------
    Scores {A: 3, B: 2, C: 1}; arcs C->A 0.25, C->B 0.75, B->A 1.0 -> {B: {A: 1.0}, C: {A: 0.25, B: 0.75}}.
    """
    plan = {}
    for node in graph:
        above = {t for t in graph if t != node and score[t] > score[node]}
        teachers = teachers_for(graph, node, above, better_only) if above else {}
        if teachers:
            plan[node] = teachers
    return plan


def graph_to_json(graph: nx.DiGraph, teachers: Iterable[Hashable], degree: Mapping[Hashable, float]) -> dict:
    """A JSON-serialisable snapshot of the graph, its degrees and teachers (saved every round).

    NaN (missing classes) becomes ``None``. Node ids are kept as they are (use ints or strings).

    Returns
    -------
    dict
        ``{"column_weights": [...], "teachers": [...], "nodes": [{"id", "position",
        "classes", "vector", "raw_vector", "degree", "teacher"}], "arcs": [{"source",
        "target", "raw", "weight", "a_s", "a_t", "a_f", "distance"}]}``.
    """
    teacher_set = set(teachers)
    nodes = [
        {
            "id": node,
            "position": [float(x) for x in data["position"]],
            "classes": [int(c) for c in data["classes"]],
            "vector": _json_floats(data["vector"]),
            "raw_vector": _json_floats(data["raw_vector"]),
            "degree": float(degree.get(node, 0.0)),
            "teacher": node in teacher_set,
        }
        for node, data in graph.nodes(data=True)
    ]
    keys = ("raw", "weight", "a_s", "a_t", "a_f", "distance")
    arcs = [{"source": i, "target": j, **{k: float(data[k]) for k in keys}} for i, j, data in graph.edges(data=True)]
    return {
        "column_weights": [float(w) for w in graph.graph.get("column_weights", [])],
        "teachers": [node for node in graph.nodes if node in teacher_set],
        "nodes": nodes,
        "arcs": arcs,
    }


def _benchmark_map(graph: nx.DiGraph, node: Hashable) -> float:
    """The node's benchmark mAP (first entry of its raw V); 0 when it has none (NaN)."""
    value = float(graph.nodes[node]["raw_vector"][0])
    return 0.0 if math.isnan(value) else value


def _check_sigma(sigma_s: float) -> None:
    if not (math.isfinite(sigma_s) and sigma_s > 0):
        raise ValueError(f"sigma_s must be a finite number > 0 (km), got {sigma_s!r}")


def _profile_fields(node: Hashable, profile: Any) -> tuple[tuple[float, float], tuple[int, ...], np.ndarray]:
    """(position, classes, performance vector) of one profile (a dict or an object); ValueError naming the node."""
    values = []
    for name in ("position", "classes", "ap"):
        value = profile.get(name) if isinstance(profile, Mapping) else getattr(profile, name, None)
        if value is None:
            raise ValueError(f"profile of node {node!r} has no {name!r}")
        values.append(value)
    position, classes, ap = values
    try:
        pos = tuple(float(x) for x in position)
        cls = tuple(sorted({int(c) for c in classes}))
        vector = performance_vector(float(x) for x in ap)
    except (TypeError, ValueError) as err:
        raise ValueError(f"profile of node {node!r}: {err}") from err
    if len(pos) != 2 or not all(math.isfinite(x) for x in pos):
        raise ValueError(f"position of node {node!r} must be 2 finite numbers (km), got {position!r}")
    return pos, cls, vector


def _json_floats(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(x) else float(x) for x in values]
