"""Collaboration graph for graph-guided distillation among edge models (paper section 4.3).

Every edge model is a node. Its performance on the shared benchmark is the vector
``V = [mAP, AP_1, ..., AP_n]``; the vectors are z-scored per column across the models,
and two models are the more alike the smaller their weighted Euclidean distance. The
arc weight between nodes i and j is the product of three affinities (spatial
proximity, task relevance, model similarity), normalised over i's neighbourhood.
High-degree nodes teach, the others learn.

**Scale.** The graph is a :class:`CollabGraph`: numpy arrays per node and arcs in CSR
order, computed in blocks of nearby nodes. Arcs are kept only where they can matter:
within ``cutoff_sigmas * sigma_s`` km, between nodes that share a class, and at most
``top_k`` per node (the strongest), so memory is ``O(M * top_k)`` and a round that
re-evaluates a few sites recomputes only their rows and their neighbours'
(:func:`update_graph`). ``build_graph(..., method="dense")`` is the all-pairs
reference (one pair at a time through the scalar affinities) that the scale benchmark
(``benchmarks/scale.py``) compares against. networkx is not needed here: the JSON
snapshot (:func:`graph_to_json`) is what the drawings and reports read.

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
from dataclasses import dataclass, field
from typing import Any

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
    return _zscore(v, *_column_stats(v))


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


@dataclass(frozen=True)
class GraphSettings:
    """How a graph is built (see :func:`build_graph`); kept with the graph so :func:`update_graph` reuses it."""

    sigma_s: float
    class_weights: tuple[float, ...] | None = None
    min_weight: float = 0.0
    cutoff_sigmas: float = 4.0
    top_k: int = 32
    block_pairs: int = 1_000_000


@dataclass(eq=False)
class CollabGraph:
    """A sparse, directed collaboration graph: per-node arrays, and arcs in CSR order (sorted by source).

    Node ``k`` is ``nodes[k]``; arc ``e`` runs ``nodes[src[e]] -> nodes[dst[e]]`` with the
    normalised ``weight[e]`` and, when the graph was built from profiles, the affinities
    ``arcs["raw" | "a_s" | "a_t" | "a_f" | "distance"][e]``. ``mean`` and ``std`` are the
    column statistics the node ``vector`` s were z-scored with (:func:`update_graph` keeps
    them). ``rows_computed`` says how many nodes' out-arcs the last build or update computed.

    Examples
    --------
    ``CollabGraph(["A", "B"], src=[0, 1], dst=[1, 0], weight=[1.0, 1.0])``: A -> B and B -> A.
    """

    nodes: list
    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray
    raw_vector: np.ndarray | None = None  # (M, n + 1) V per node; NaN when unknown
    vector: np.ndarray | None = None  # (M, n + 1) z-scored V
    position: np.ndarray | None = None  # (M, 2) km
    classes: list[tuple[int, ...]] | None = None
    arcs: dict[str, np.ndarray] = field(default_factory=dict)
    column_weights: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    settings: GraphSettings | None = None
    rows_computed: int = 0

    def __post_init__(self) -> None:
        m = len(self.nodes)
        self.nodes = list(self.nodes)
        self.index = {node: k for k, node in enumerate(self.nodes)}
        if len(self.index) != m:
            raise ValueError(f"node ids must be unique, got {self.nodes!r}")
        src, dst = np.asarray(self.src, dtype=np.int64), np.asarray(self.dst, dtype=np.int64)
        weight = np.asarray(self.weight, dtype=float)
        if not (src.shape == dst.shape == weight.shape and src.ndim == 1):
            raise ValueError(f"src, dst and weight must be 1-D of equal length, got {src.shape}, {dst.shape}, "
                             f"{weight.shape}")
        if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= m):
            raise ValueError(f"arc ends must be node indices in [0, {m}), got src {src.tolist()} dst {dst.tolist()}")
        order = np.lexsort((dst, src))
        self.src, self.dst, self.weight = src[order], dst[order], weight[order]
        self.arcs = {k: np.asarray(v, dtype=float)[order] for k, v in self.arcs.items()}
        self.indptr = np.searchsorted(self.src, np.arange(m + 1))
        width = 1 if self.raw_vector is None else np.asarray(self.raw_vector).shape[1]
        self.raw_vector = np.full((m, width), np.nan) if self.raw_vector is None else np.asarray(self.raw_vector, float)
        self.vector = np.full((m, width), np.nan) if self.vector is None else np.asarray(self.vector, float)
        self.position = np.zeros((m, 2)) if self.position is None else np.asarray(self.position, float).reshape(m, 2)
        self.classes = [()] * m if self.classes is None else list(self.classes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, node: Hashable) -> bool:
        return node in self.index

    @property
    def num_arcs(self) -> int:
        return int(self.src.size)

    def benchmark_map(self) -> np.ndarray:
        """Every node's benchmark mAP (first entry of its raw V); 0 when it has none (NaN)."""
        return np.nan_to_num(self.raw_vector[:, 0], nan=0.0)


def build_graph(
    profiles: Mapping[Hashable, Any],
    sigma_s: float,
    class_weights: Iterable[float] | None = None,
    min_weight: float = 0.0,
    *,
    cutoff_sigmas: float = 4.0,
    top_k: int = 32,
    method: str = "sparse",
    block_pairs: int = 1_000_000,
) -> CollabGraph:
    """Collaboration graph of the edge models (paper section 4.3), sparse and computed in numpy blocks.

    For nodes i != j: ``raw_ij = a_s * a_t * a_f`` (symmetric). The arc i -> j is kept when
    ``raw_ij > min_weight``, the two nodes share a class (``a_t > 0``), j lies within
    ``cutoff_sigmas * sigma_s`` km of i (``a_s >= exp(-cutoff_sigmas^2 / 2)``: 3.4e-4 at 4)
    and j is among i's ``top_k`` neighbours by ``raw`` (ties to the lower node index).
    It carries ``weight = raw_ij / sum_k raw_ik`` over i's *kept* out-arcs (the paper's
    one-hop normalisation; out-weights of a node sum to 1). So every kept arc's ``raw``,
    ``a_s``, ``a_t``, ``a_f`` and ``distance`` equal the dense computation's, and its
    weight equals the dense one whenever nothing of i's neighbourhood is cut, as with
    the defaults at up to 33 sites on a 5 km circle (``common.visdrone.site_positions``).
    Cost: ``O(M^2)`` cheap arithmetic in blocks of ``block_pairs`` pairs for the spatial
    and class filters, then ``O(M * neighbours)`` for the rest; memory ``O(M * top_k)``.

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
        Arcs with ``raw <= min_weight`` are left out; 0 drops only zero-affinity pairs.
    cutoff_sigmas : float
        Spatial cut-off in units of ``sigma_s``; 0 keeps every distance.
    top_k : int
        Out-arcs kept per node; 0 keeps all.
    method : ``"sparse"`` or ``"dense"``
        ``"dense"`` is the reference the scale benchmark compares against: every pair,
        one at a time, through :func:`spatial_affinity`, :func:`task_relevance`,
        :func:`weighted_distance` and :func:`model_affinity`, with no cut-off and no top-k.

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
    if not (math.isfinite(cutoff_sigmas) and cutoff_sigmas >= 0):
        raise ValueError(f"cutoff_sigmas must be a finite number >= 0 (0: no cut-off), got {cutoff_sigmas!r}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k must be an int >= 0 (0: keep all), got {top_k!r}")
    if method not in ("sparse", "dense"):
        raise ValueError(f"method={method!r}: expected 'sparse' or 'dense'")
    if not (isinstance(block_pairs, int) and block_pairs >= 1):
        raise ValueError(f"block_pairs must be an int >= 1, got {block_pairs!r}")
    nodes, position, classes, raw_vector = _profile_arrays(profiles)
    per_class = None if class_weights is None else tuple(float(w) for w in class_weights)
    n_classes = raw_vector.shape[1] - 1
    if per_class is not None and nodes:
        if len(per_class) != n_classes:
            raise ValueError(f"class_weights has {len(per_class)} entries, expected one per class ({n_classes})")
        if not all(math.isfinite(w) and w >= 0 for w in per_class):
            raise ValueError(f"class_weights must be finite and non-negative, got {list(per_class)}")
    settings = GraphSettings(float(sigma_s), per_class, float(min_weight), float(cutoff_sigmas), top_k, block_pairs)
    graph = _assemble(nodes, position, classes, raw_vector, settings, dense=method == "dense")
    logger.debug("build_graph: %d nodes, %d arcs (%s)", len(graph), graph.num_arcs, method)
    return graph


def update_graph(graph: CollabGraph, profiles: Mapping[Hashable, Any], removed: Iterable[Hashable] = (),
                 renorm_tol: float = 0.02) -> CollabGraph:
    """The graph after some nodes changed (``profiles``: new or re-evaluated nodes) and others left.

    Only the rows that can differ are computed again: the changed nodes' out-arcs, and the
    out-arcs of every node that had an arc to a changed or removed node or that a changed
    node would now enter (its ``raw`` beats the node's k-th kept arc, or the node keeps
    fewer than ``top_k``). The other rows keep their arcs as they are. The z-scoring
    statistics stay those the graph was built with, so the result equals
    ``build_graph`` over all current profiles *with those statistics*. When they no longer
    fit, i.e. a column's mean or standard deviation over the current profiles moved by
    more than ``renorm_tol`` of the old standard deviation, or the set of columns that are
    NaN for some node changed, the whole graph is built again (``rows_computed == len``).

    Examples
    --------
    1 % of 10,000 sites re-evaluated -> about 100 changed rows plus their ~``top_k`` in-neighbours each.
    """
    if not renorm_tol >= 0:
        raise ValueError(f"renorm_tol must be >= 0 (inf: never rebuild), got {renorm_tol!r}")
    settings = graph.settings
    if settings is None:
        raise ValueError("update_graph needs a graph made by build_graph (it has no build settings)")
    gone = set(removed)
    unknown = gone - set(graph.index)
    if unknown:
        raise ValueError(f"removed nodes are not in the graph: {sorted(map(repr, unknown))}")
    changed_nodes, c_position, c_classes, c_raw = _profile_arrays(profiles)
    if not set(graph.nodes) - gone:  # nothing left to keep
        return _assemble(changed_nodes, c_position, c_classes, c_raw, settings)
    if changed_nodes and c_raw.shape[1] != graph.raw_vector.shape[1]:
        raise ValueError(f"AP vectors of {changed_nodes[0]!r} have {c_raw.shape[1] - 1} classes, the graph's "
                         f"{graph.raw_vector.shape[1] - 1}")
    old_to_new = np.full(len(graph), -1, dtype=np.int64)
    kept = [k for k, node in enumerate(graph.nodes) if node not in gone]
    old_to_new[kept] = np.arange(len(kept))
    nodes = [graph.nodes[k] for k in kept]
    position, classes, raw_vector = graph.position[kept], [graph.classes[k] for k in kept], graph.raw_vector[kept]
    index = {node: k for k, node in enumerate(nodes)}
    new = [node for node in changed_nodes if node not in index]
    nodes += new
    position = np.vstack([position, np.zeros((len(new), 2))])
    raw_vector = np.vstack([raw_vector, np.zeros((len(new), raw_vector.shape[1]))])
    classes += [()] * len(new)
    index.update({node: len(kept) + i for i, node in enumerate(new)})
    changed = np.array([index[node] for node in changed_nodes], dtype=np.int64)
    position[changed], raw_vector[changed] = c_position, c_raw
    for k, cls in zip(changed.tolist(), c_classes):
        classes[k] = cls

    mean, std = _column_stats(raw_vector)
    column_weights = _column_weights(raw_vector, settings.class_weights)
    if (not np.array_equal(column_weights, graph.column_weights)
            or _drift(graph.mean, graph.std, mean, std, column_weights) > renorm_tol):
        return _assemble(nodes, position, classes, raw_vector, settings)
    vector = _zscore(raw_vector, graph.mean, graph.std)
    fresh = CollabGraph(nodes, [], [], [], raw_vector=raw_vector, vector=vector, position=position, classes=classes,
                        column_weights=column_weights, mean=graph.mean, std=graph.std, settings=settings)
    # old arcs, renumbered; rows touching a changed or removed node are computed again
    src, dst = old_to_new[graph.src], old_to_new[graph.dst]
    is_changed = np.zeros(len(nodes), dtype=bool)
    is_changed[changed] = True
    redo = is_changed.copy()
    live = src >= 0
    redo[src[live & ((dst < 0) | is_changed[np.maximum(dst, 0)])]] = True
    candidates = _rows(fresh, changed, top_k=0)  # every pair a changed node forms (raw is symmetric)
    if settings.top_k:
        counts = np.bincount(src[live], minlength=len(nodes))
        kth = np.full(len(nodes), np.inf)
        np.minimum.at(kth, src[live], graph.arcs["raw"][live])
        tail = candidates["dst"]
        enters = (counts[tail] < settings.top_k) | (candidates["raw"] >= kth[tail])
        redo[tail[enters]] = True
    else:
        redo[candidates["dst"]] = True
    keep = live & ~redo[np.maximum(src, 0)]
    rows = np.flatnonzero(redo)
    recomputed = _rows(fresh, rows)
    arcs = {name: np.concatenate([graph.arcs[name][keep], recomputed[name]]) for name in _ARC_FIELDS}
    return _with_arcs(fresh, np.concatenate([src[keep], recomputed["src"]]),
                      np.concatenate([dst[keep], recomputed["dst"]]), arcs, rows.size)


def teacher_degree(graph: CollabGraph) -> dict[Hashable, float]:
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
    strength = np.bincount(graph.dst, weights=graph.weight, minlength=len(graph))
    return dict(zip(graph.nodes, strength.tolist()))


def accuracy_weighted_degree(graph: CollabGraph,
                             degree: Mapping[Hashable, float] | None = None) -> dict[Hashable, float]:
    """Teacher score ``d_i * mAP_i``: in-strength weighted by benchmark mAP (our addition, see the module docstring).

    ``mAP_i`` is the node's benchmark mAP (``raw_vector[0]``, the mean of its present
    classes' AP); a node without any AP (NaN) scores 0 and never teaches.

    Examples
    --------
    In-strengths {A: 2, B: 0.8, C: 0.2} and mAPs {A: 0.1, B: 0.5, C: 0.4} ->
    {A: 0.2, B: 0.4, C: 0.08}: B, less central but five times as accurate, ranks first.
    """
    degree = teacher_degree(graph) if degree is None else degree
    return {node: float(degree.get(node, 0.0)) * m for node, m in zip(graph.nodes, graph.benchmark_map().tolist())}


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


def teachers_for(graph: CollabGraph, student: Hashable, teachers: Iterable[Hashable],
                 better_only: bool = False) -> dict[Hashable, float]:
    """The student's teachers and their mixing weights (paper section 4.3: "if its neighbor j is in T").

    ``w_j = a_ij / sum_{k in N(i) ∩ T} a_ik`` over the student's out-neighbours that are
    teachers (never the student itself); the weights sum to 1. A student without a
    teacher neighbour gets ``{}`` and trains without KD this round. In the paper only
    nodes outside T are students; the caller asks for those (:func:`teacher_plan` does
    it for all students at once). With ``better_only`` a teacher whose benchmark mAP is
    not strictly above the student's is left out (our addition, see the module docstring).

    Examples
    --------
    Student S with arcs S->A 0.5, S->B 0.3, S->C 0.2 and T = {A, B} -> {A: 0.625, B: 0.375}.
    """
    if student not in graph:
        raise ValueError(f"student {student!r} is not a node of the graph")
    k = graph.index[student]
    arcs = slice(graph.indptr[k], graph.indptr[k + 1])
    return _plan(graph, arcs, _is_node(graph, teachers)[graph.dst[arcs]], better_only).get(student, {})


def teacher_plan(graph: CollabGraph, teachers: Iterable[Hashable],
                 better_only: bool = False) -> dict[Hashable, dict[Hashable, float]]:
    """``{student: teachers_for(graph, student, teachers, better_only)}`` for every node outside ``teachers``.

    Students without a teacher neighbour are left out (they sit the KD round out).

    Examples
    --------
    Arcs S->A 0.5, S->B 0.3, S->C 0.2, C->A 1.0 and T = {A, B} -> {S: {A: 0.625, B: 0.375}, C: {A: 1.0}}.
    """
    is_teacher = _is_node(graph, teachers)
    return _plan(graph, slice(None), is_teacher[graph.dst] & ~is_teacher[graph.src], better_only)


def local_plan(graph: CollabGraph, score: Mapping[Hashable, float],
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
    values = np.array([float(score[node]) for node in graph.nodes])
    return _plan(graph, slice(None), values[graph.dst] > values[graph.src], better_only)


def graph_to_json(graph: CollabGraph, teachers: Iterable[Hashable], degree: Mapping[Hashable, float]) -> dict:
    """A JSON-serialisable snapshot of the graph, its degrees and teachers (saved every round).

    NaN (missing classes) becomes ``None``. Node ids are kept as they are (use ints or strings).

    Returns
    -------
    dict
        ``{"column_weights": [...], "teachers": [...], "nodes": [{"id", "position",
        "classes", "vector", "raw_vector", "degree", "teacher"}], "arcs": [{"source",
        "target", "raw", "weight", "a_s", "a_t", "a_f", "distance"}]}`` (an arc lists
        the affinities the graph holds: all of them when built from profiles).
    """
    teacher_set = set(teachers)
    vectors = (_json_floats(row) for row in graph.vector.tolist())
    raw_vectors = (_json_floats(row) for row in graph.raw_vector.tolist())
    nodes = [
        {"id": node, "position": pos, "classes": list(cls), "vector": vec, "raw_vector": raw,
         "degree": float(degree.get(node, 0.0)), "teacher": node in teacher_set}
        for node, pos, cls, vec, raw in zip(graph.nodes, graph.position.tolist(), graph.classes, vectors, raw_vectors)
    ]
    ids = graph.nodes
    keys = ["weight", *(k for k in _ARC_FIELDS if k in graph.arcs)]
    columns = [graph.weight.tolist(), *(graph.arcs[k].tolist() for k in keys[1:])]
    arcs = [{"source": ids[i], "target": ids[j], **dict(zip(keys, values))}
            for i, j, *values in zip(graph.src.tolist(), graph.dst.tolist(), *columns)]
    column_weights = [] if graph.column_weights is None else [float(w) for w in graph.column_weights]
    return {
        "column_weights": column_weights,
        "teachers": [node for node in graph.nodes if node in teacher_set],
        "nodes": nodes,
        "arcs": arcs,
    }


# --------------------------------------------------------------------------- internals

_ARC_FIELDS = ("raw", "a_s", "a_t", "a_f", "distance")
_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def _column_stats(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and population std over the present (non-NaN) entries."""
    present = ~np.isnan(vectors)
    count = np.maximum(present.sum(axis=0), 1)
    mean = np.where(present, vectors, 0.0).sum(axis=0) / count
    std = np.sqrt((np.where(present, vectors - mean, 0.0) ** 2).sum(axis=0) / count)
    return mean, std


def _zscore(vectors: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    spread = std >= _ZERO_SPREAD
    z = np.where(spread, (vectors - mean) / np.where(spread, std, 1.0), 0.0)
    return np.where(np.isnan(vectors), np.nan, z)


def _column_weights(raw_vector: np.ndarray, per_class: tuple[float, ...] | None) -> np.ndarray:
    """Distance weight per column: 1 for mAP, the class weights, 0 for a column NaN for any node."""
    weights = np.concatenate([[1.0], np.ones(raw_vector.shape[1] - 1) if per_class is None else per_class])
    weights[np.isnan(raw_vector).any(axis=0)] = 0.0
    return weights


def _drift(mean_old, std_old, mean_new, std_new, column_weights) -> float:
    """How far the column statistics moved, in units of the old standard deviation (inf: a spread appeared)."""
    used = column_weights > 0
    spread = std_old >= _ZERO_SPREAD
    if np.any(used & ~spread & (std_new >= _ZERO_SPREAD)):
        return math.inf
    cols = used & spread
    if not cols.any():
        return 0.0
    moved = np.maximum(np.abs(mean_new - mean_old), np.abs(std_new - std_old))[cols] / std_old[cols]
    return float(moved.max())


def _profile_arrays(profiles: Mapping[Hashable, Any]):
    """(nodes, positions (M, 2), classes, V (M, n + 1)); ValueError naming a bad node."""
    nodes = list(profiles)
    fields = [_profile_fields(node, profiles[node]) for node in nodes]
    lengths = {node: len(f[2]) for node, f in zip(nodes, fields)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"AP vectors differ in length (classes per node): {lengths}")
    if not nodes:
        return nodes, np.zeros((0, 2)), [], np.zeros((0, 1))
    ap = np.array([f[2] for f in fields], dtype=float)
    present = ~np.isnan(ap)
    bad = np.flatnonzero(~present.any(axis=1) | (present & ~((ap >= 0.0) & (ap <= 1.0))).any(axis=1))
    if bad.size:  # performance_vector names the problem
        node = nodes[bad[0]]
        try:
            performance_vector(ap[bad[0]])
        except ValueError as err:
            raise ValueError(f"profile of node {node!r}: {err}") from err
    mean_ap = np.where(present, ap, 0.0).sum(axis=1) / present.sum(axis=1)
    return nodes, np.array([f[0] for f in fields]), [f[1] for f in fields], np.column_stack([mean_ap, ap])


def _assemble(nodes, position, classes, raw_vector, settings: GraphSettings, dense: bool = False) -> CollabGraph:
    """A whole graph from node arrays: fresh z-scoring statistics, every row computed."""
    mean, std = _column_stats(raw_vector)
    graph = CollabGraph(nodes, [], [], [], raw_vector=raw_vector, vector=_zscore(raw_vector, mean, std),
                        position=position, classes=classes,
                        column_weights=_column_weights(raw_vector, settings.class_weights),
                        mean=mean, std=std, settings=settings)
    arcs = _dense_rows(graph) if dense else _rows(graph, np.arange(len(nodes)))
    return _with_arcs(graph, arcs["src"], arcs["dst"], arcs, len(nodes))


def _with_arcs(graph: CollabGraph, src, dst, arcs, rows_computed: int) -> CollabGraph:
    """The graph with these arcs, weights normalised over each source's kept out-arcs."""
    raw = arcs["raw"]
    total = np.bincount(src, weights=raw, minlength=len(graph))
    weight = raw / np.where(total > 0, total, 1.0)[src]
    return CollabGraph(graph.nodes, src, dst, weight, raw_vector=graph.raw_vector, vector=graph.vector,
                       position=graph.position, classes=graph.classes,
                       arcs={k: arcs[k] for k in _ARC_FIELDS}, column_weights=graph.column_weights,
                       mean=graph.mean, std=graph.std, settings=graph.settings, rows_computed=rows_computed)


def _empty_arcs() -> dict[str, np.ndarray]:
    return {"src": np.zeros(0, np.int64), "dst": np.zeros(0, np.int64), **{k: np.zeros(0) for k in _ARC_FIELDS}}


def _rows(graph: CollabGraph, rows: np.ndarray, top_k: int | None = None) -> dict[str, np.ndarray]:
    """The kept out-arcs of the given source rows, in blocks of nearby rows.

    A block of rows is compared with the nodes inside its bounding box grown by the
    spatial cut-off (every node when there is none), at most ``block_pairs`` pairs at once.
    """
    settings = graph.settings
    top_k = settings.top_k if top_k is None else top_k
    m = len(graph)
    if m == 0 or len(rows) == 0:
        return _empty_arcs()
    words = 1 + max((max(c) for c in graph.classes if c), default=0) // 64
    member = np.zeros((m, words), dtype=np.uint64)  # class sets as bit masks
    for k, cls in enumerate(graph.classes):
        for c in cls:
            member[k, c // 64] |= np.uint64(1 << (c % 64))
    n_classes = np.array([len(c) for c in graph.classes], dtype=float)
    scaled = np.nan_to_num(graph.vector) * np.sqrt(graph.column_weights)  # w_k (z_ik - z_jk)^2 = (s_ik - s_jk)^2
    radius2 = (settings.cutoff_sigmas * settings.sigma_s) ** 2 if settings.cutoff_sigmas else math.inf
    px, py = graph.position[:, 0], graph.position[:, 1]
    rows = np.asarray(rows, dtype=np.int64)
    reach = math.sqrt(radius2)
    by_x = np.argsort(px, kind="stable")
    sorted_x = px[by_x]
    if math.isfinite(reach):  # blocks of nearby rows, each against the nodes in its bounding box grown by the cut-off
        rows = rows[np.lexsort((np.floor(py[rows] / reach), np.floor(px[rows] / reach)))]
    step = max(1, min(256, settings.block_pairs // m))
    parts = []
    for start in range(0, len(rows), step):
        block = rows[start:start + step]
        cols = np.arange(m)
        if math.isfinite(reach):
            lo = np.searchsorted(sorted_x, px[block].min() - reach, side="left")
            hi = np.searchsorted(sorted_x, px[block].max() + reach, side="right")
            cols = by_x[lo:hi]
            cols = np.sort(cols[(py[cols] >= py[block].min() - reach) & (py[cols] <= py[block].max() + reach)])
        dx, dy = px[block, None] - px[None, cols], py[block, None] - py[None, cols]
        d2 = dx * dx + dy * dy
        overlap = (member[block][:, None, :] & member[cols][None, :, :]).any(axis=2)
        bi, bj = np.nonzero(overlap & (d2 <= radius2) & (block[:, None] != cols[None, :]))
        i, j = block[bi], cols[bj]
        d2 = d2[bi, bj]
        common = (member[i] & member[j]).view(np.uint8).reshape(i.size, 8 * words)
        shared = _POPCOUNT[common].sum(axis=1, dtype=float)
        distance = np.zeros(i.size)
        for column in np.ascontiguousarray(scaled.T):  # a gather per column: temporaries of one value per pair
            distance += (column[i] - column[j]) ** 2
        np.sqrt(distance, out=distance)
        a_s = np.exp(-d2 / (2.0 * settings.sigma_s**2))
        a_t = shared / np.maximum(n_classes[i], n_classes[j])
        a_f = 1.0 / (1.0 + distance)
        raw = a_s * a_t * a_f
        keep = np.flatnonzero(raw > settings.min_weight)
        if top_k:  # a block holds whole rows: keep each row's best top_k (ties to the lower node index)
            keep = keep[np.lexsort((j[keep], -raw[keep], i[keep]))]
            first = np.searchsorted(i[keep], i[keep], side="left")
            keep = keep[np.arange(keep.size) - first < top_k]
        parts.append({"src": i[keep], "dst": j[keep], "raw": raw[keep], "a_s": a_s[keep], "a_t": a_t[keep],
                      "a_f": a_f[keep], "distance": distance[keep]})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _dense_rows(graph: CollabGraph) -> dict[str, np.ndarray]:
    """Every pair, one at a time, through the scalar affinities (the reference ``method="dense"``)."""
    settings = graph.settings
    found = {k: [] for k in ("src", "dst", *_ARC_FIELDS)}
    for a in range(len(graph)):
        for b in range(a + 1, len(graph)):
            distance = weighted_distance(graph.vector[a], graph.vector[b], graph.column_weights)
            a_s = spatial_affinity(graph.position[a], graph.position[b], settings.sigma_s)
            a_t = task_relevance(graph.classes[a], graph.classes[b])
            a_f = model_affinity(distance)
            raw = a_s * a_t * a_f
            if raw > settings.min_weight:
                for i, j in ((a, b), (b, a)):
                    for key, value in zip(found, (i, j, raw, a_s, a_t, a_f, distance)):
                        found[key].append(value)
    return {k: np.array(v, dtype=np.int64 if k in ("src", "dst") else float) for k, v in found.items()}


def _is_node(graph: CollabGraph, nodes: Iterable[Hashable]) -> np.ndarray:
    mask = np.zeros(len(graph), dtype=bool)
    mask[[graph.index[n] for n in set(nodes) if n in graph.index]] = True
    return mask


def _plan(graph: CollabGraph, arcs: slice, keep: np.ndarray, better_only: bool) -> dict[Hashable, dict]:
    """``{tail: {head: weight renormalised over the tail's kept arcs}}`` for the arcs in ``arcs`` where ``keep``."""
    src, dst, weight = graph.src[arcs][keep], graph.dst[arcs][keep], graph.weight[arcs][keep]
    if better_only:
        accuracy = graph.benchmark_map()
        better = accuracy[dst] > accuracy[src]
        src, dst, weight = src[better], dst[better], weight[better]
    total = np.bincount(src, weights=weight, minlength=len(graph))
    plan: dict[Hashable, dict[Hashable, float]] = {}
    ids = graph.nodes
    for i, j, w in zip(src.tolist(), dst.tolist(), (weight / np.where(total > 0, total, 1.0)[src]).tolist()):
        plan.setdefault(ids[i], {})[ids[j]] = w
    return plan


def _check_sigma(sigma_s: float) -> None:
    if not (math.isfinite(sigma_s) and sigma_s > 0):
        raise ValueError(f"sigma_s must be a finite number > 0 (km), got {sigma_s!r}")


def _profile_fields(node: Hashable, profile: Any) -> tuple[tuple[float, float], tuple[int, ...], list[float]]:
    """(position, classes, per-class AP) of one profile (a dict or an object); ValueError naming the node."""
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
        ap = [float(x) for x in ap]
    except (TypeError, ValueError) as err:
        raise ValueError(f"profile of node {node!r}: {err}") from err
    if not ap:
        raise ValueError(f"profile of node {node!r}: ap must be a non-empty sequence of per-class AP")
    if len(pos) != 2 or not all(math.isfinite(x) for x in pos):
        raise ValueError(f"position of node {node!r} must be 2 finite numbers (km), got {position!r}")
    if any(c < 0 for c in cls):
        raise ValueError(f"classes of node {node!r} must be ids >= 0, got {list(classes)!r}")
    return pos, cls, ap


def _json_floats(values: Iterable[float]) -> list[float | None]:
    return [None if math.isnan(x) else float(x) for x in values]
