"""Tests for common.graph: the collaboration graph of paper section 4.3."""

import json
import math
from types import SimpleNamespace

import networkx as nx
import numpy as np
import pytest

from common import graph as graph_mod
from common.graph import (
    CollabGraph,
    accuracy_weighted_degree,
    build_graph,
    graph_to_json,
    latlon_to_km,
    model_affinity,
    normalize_vectors,
    performance_vector,
    select_teachers,
    small_object_class_weights,
    spatial_affinity,
    task_relevance,
    teacher_degree,
    teacher_plan,
    teachers_for,
    update_graph,
    weighted_distance,
)

NAN = float("nan")


def _two_node_profiles():
    # A at (0, 0), classes {0, 1}, AP [0.2, 0.6]; B at (3, 4) km, classes {1}, AP [0.4, 0.4]
    return {
        "A": {"position": (0.0, 0.0), "classes": [0, 1], "ap": [0.2, 0.6]},
        "B": {"position": (3.0, 4.0), "classes": [1], "ap": [0.4, 0.4]},
    }


def _four_node_profiles():
    rng = np.random.default_rng(7)
    positions = {"a": (0.0, 0.0), "b": (1.0, 0.0), "c": (0.0, 2.0), "d": (3.0, 3.0)}
    classes = {"a": {0, 1, 2}, "b": {0, 1}, "c": {1, 2}, "d": {2}}
    return {n: {"position": positions[n], "classes": classes[n], "ap": rng.uniform(0.1, 0.9, 3)} for n in positions}


def _reference_weights(profiles, sigma_s, class_weights, stats=None, cutoff_sigmas=0.0, top_k=0):
    """Independent numpy reference for the arc weights of paper section 4.3 (row-normalised raw affinity).

    ``stats`` = (mean, std) to z-score with (default: the profiles' own); ``cutoff_sigmas`` and ``top_k`` as in
    build_graph (0: off). Returns the node order, the raw matrix (0 where no arc) and the weights.
    """
    nodes = list(profiles)
    ap = np.array([profiles[n]["ap"] for n in nodes])
    v = np.column_stack([ap.mean(axis=1), ap])
    mean, std = stats if stats is not None else (v.mean(axis=0), v.std(axis=0))
    z = (v - mean) / std
    w = np.concatenate([[1.0], class_weights])
    dist = np.sqrt((w * (z[:, None, :] - z[None, :, :]) ** 2).sum(axis=-1))
    pos = np.array([profiles[n]["position"] for n in nodes])
    d2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(axis=-1)
    a_s = np.exp(-d2 / (2 * sigma_s**2))
    sets = [set(profiles[n]["classes"]) for n in nodes]
    a_t = np.array([[len(ci & cj) / max(len(ci), len(cj)) for cj in sets] for ci in sets])
    raw = a_s * a_t / (1 + dist)
    np.fill_diagonal(raw, 0.0)
    if cutoff_sigmas:
        raw[d2 > (cutoff_sigmas * sigma_s) ** 2] = 0.0
    if top_k:
        for row in raw:
            row[np.argsort(-row, kind="stable")[top_k:]] = 0.0
    return nodes, raw, raw / raw.sum(axis=1, keepdims=True)


def _arcs_graph(arcs, maps=None):
    """A CollabGraph from (tail, head, weight) arcs; ``maps``: benchmark mAP per node (raw_vector [m, m])."""
    nodes = sorted({n for arc in arcs for n in arc[:2]} | set(maps or {}))
    raw_vector = None if maps is None else [[maps[n], maps[n]] for n in nodes]
    return CollabGraph(nodes, [nodes.index(a[0]) for a in arcs], [nodes.index(a[1]) for a in arcs],
                       [a[2] for a in arcs], raw_vector=raw_vector)


def _to_networkx(g):
    """The independent networkx view of a CollabGraph's arcs."""
    ref = nx.DiGraph()
    ref.add_nodes_from(g.nodes)
    ref.add_weighted_edges_from((g.nodes[i], g.nodes[j], w) for i, j, w in zip(g.src, g.dst, g.weight))
    return ref


def _out_arcs(g, node):
    """{neighbour: weight} of the node's out-arcs."""
    k = g.index[node]
    return {g.nodes[j]: w for i, j, w in zip(g.src, g.dst, g.weight) if i == k}


def _arc(g, i, j):
    """{weight, raw, a_s, ...} of arc i -> j, or None."""
    hits = np.flatnonzero((g.src == g.index[i]) & (g.dst == g.index[j]))
    if not hits.size:
        return None
    return {"weight": g.weight[hits[0]], **{k: v[hits[0]] for k, v in g.arcs.items()}}


# --- performance vectors and normalisation -------------------------------------------------


def test_performance_vector_mean_and_nan():
    """Paper 4.3, V_model = [mAP, AP_1..AP_n]: mAP is the mean over present classes; NaN stays NaN."""
    # Prepare: class 2 is absent from the benchmark
    ap = [0.2, 0.4, NAN]
    # Execute
    v = performance_vector(ap)
    # Assert: mAP = (0.2 + 0.4) / 2 = 0.3
    np.testing.assert_allclose(v, [0.3, 0.2, 0.4, NAN])


@pytest.mark.parametrize(
    ("ap", "message"),
    [([], "non-empty"), ([NAN, NAN], "all NaN"), ([0.2, 1.5], "1.5"), ([0.2, float("inf")], "inf"), ([-0.1], "-0.1")],
)
def test_performance_vector_rejects_bad_input(ap, message):
    """Paper 4.3, V_model: AP must be in [0, 1] (or NaN); the error names the bad value."""
    with pytest.raises(ValueError, match=message):
        performance_vector(ap)


def test_normalize_vectors_matches_numpy_zscore():
    """Paper 4.3, AP_i' = (AP_i - mu_i) / sigma_i with the population std (ddof=0)."""
    # Prepare
    v = np.random.default_rng(0).uniform(0, 1, (5, 4))
    # Execute
    z = normalize_vectors(v)
    # Assert: independent numpy reference; each column has mean 0, population std 1
    np.testing.assert_allclose(z, (v - v.mean(axis=0)) / v.std(axis=0, ddof=0))
    np.testing.assert_allclose(z.std(axis=0), 1.0)


def test_normalize_vectors_hand_worked_and_zero_spread():
    """Paper 4.3 normalisation: column [0.2, 0.4] -> mu 0.3, sigma 0.1 -> [-1, 1]; equal columns -> 0, never NaN."""
    # Prepare: 0.1 + 0.2 != 0.3 in floating point, so the second column has spread ~1e-17
    v = np.array([[0.2, 0.3, 0.5], [0.4, 0.1 + 0.2, 0.5]])
    # Execute
    z = normalize_vectors(v)
    # Assert: exact zeros where the spread is (numerically) zero
    np.testing.assert_allclose(z[:, 0], [-1.0, 1.0])
    np.testing.assert_array_equal(z[:, 1:], np.zeros((2, 2)))


def test_normalize_vectors_single_model_is_all_zero():
    """Paper 4.3 normalisation with M = 1: sigma = 0 in every column -> zeros, not NaN."""
    assert np.array_equal(normalize_vectors(np.array([[0.3, 0.2, 0.4]])), np.zeros((1, 3)))


def test_normalize_vectors_ignores_nan_entries():
    """Paper 4.3 normalisation: NaN (class absent) is left out of mu and sigma and stays NaN."""
    # Prepare: column [0.2, NaN, 0.4] -> mu 0.3, sigma 0.1 over the present entries
    v = np.array([[0.2], [NAN], [0.4]])
    # Execute / Assert
    np.testing.assert_allclose(normalize_vectors(v), [[-1.0], [NAN], [1.0]])


# --- distance and affinities -------------------------------------------------------------


def test_weighted_distance_hand_worked():
    """Paper 4.3, D_weighted = sqrt(sum_k w_k (V_ik - V_jk)^2)."""
    # [0,0] vs [3,4]: sqrt(9 + 16) = 5; w = [1, 0.25]: sqrt(9 + 4) = sqrt(13)
    assert weighted_distance([0, 0], [3, 4]) == pytest.approx(5.0)
    assert weighted_distance([0, 0], [3, 4], [1, 0.25]) == pytest.approx(math.sqrt(13))
    assert weighted_distance([0.1, 0.7], [0.1, 0.7]) == 0.0


def test_weighted_distance_matches_numpy():
    """Paper 4.3, D_weighted against an independent numpy expression."""
    rng = np.random.default_rng(1)
    a, b, w = rng.normal(size=6), rng.normal(size=6), rng.uniform(0, 2, 6)
    assert weighted_distance(a, b, w) == pytest.approx(np.sqrt(np.sum(w * (a - b) ** 2)))


def test_weighted_distance_nan_column():
    """Paper 4.3, D_weighted: a NaN column is skipped when its weight is 0 and an error otherwise."""
    # [0, 3, NaN] vs [0, 4, 0.5] with w = [1, 1, 0] -> sqrt(1) = 1
    assert weighted_distance([0, 3, NAN], [0, 4, 0.5], [1, 1, 0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="column 2"):
        weighted_distance([0, 3, NAN], [0, 4, 0.5])


@pytest.mark.parametrize(
    ("v_j", "w", "message"),
    [([1, 2, 3], None, r"\(2,\) and \(3,\)"), ([1, 2], [1, -1], "-1"), ([1, 2], [1], r"\(1,\)")],
)
def test_weighted_distance_rejects_bad_input(v_j, w, message):
    """Paper 4.3, D_weighted: shapes must agree, weights must be non-negative."""
    with pytest.raises(ValueError, match=message):
        weighted_distance([0, 0], v_j, w)


def test_small_object_class_weights_hand_worked():
    """Paper 4.3, w_k for small objects (garbled in the paper): w_k = (1 + s_k) / mean(1 + s), s_k = small_k / N_k."""
    # Prepare: shares s = [0, 0.5, 1] -> 1 + s = [1, 1.5, 2], mean 1.5
    small, total = [0, 5, 10], [10, 10, 10]
    # Execute
    w = small_object_class_weights(small, total)
    # Assert: [1/1.5, 1.5/1.5, 2/1.5]; mean 1; grows with the share
    np.testing.assert_allclose(w, [2 / 3, 1.0, 4 / 3])
    assert w.mean() == pytest.approx(1.0)


def test_small_object_class_weights_absent_class_and_errors():
    """Paper 4.3, w_k: a class with no instance has share 0; small > total is an error naming the counts."""
    # shares [0 (absent), 1] -> [1, 2] / 1.5
    np.testing.assert_allclose(small_object_class_weights([0, 4], [0, 4]), [2 / 3, 4 / 3])
    with pytest.raises(ValueError, match=r"\[5.0\]"):
        small_object_class_weights([5], [3])
    with pytest.raises(ValueError, match="equal length"):
        small_object_class_weights([1, 2], [3])


def test_spatial_affinity_hand_worked():
    """Paper 4.3 eq. (1), a_s = exp(-||p_i - p_j||^2 / (2 sigma_s^2))."""
    # ||(3, 4)||^2 = 25, 2 * 5^2 = 50 -> exp(-0.5) = 0.60653
    assert spatial_affinity((0, 0), (3, 4), 5.0) == pytest.approx(0.6065306597)
    assert spatial_affinity((1, 1), (1, 1), 0.1) == 1.0


@pytest.mark.parametrize("sigma_s", [0.0, -2.0, NAN])
def test_spatial_affinity_rejects_bad_sigma(sigma_s):
    """Paper 4.3 eq. (1): sigma_s must be > 0; the error names the value."""
    with pytest.raises(ValueError, match=f"sigma_s.*{sigma_s}"):
        spatial_affinity((0, 0), (1, 1), sigma_s)


def test_latlon_to_km_hand_worked():
    """Paper 4.3 eq. (1), p_i as 2-D geolocation: equirectangular km, x scaled by cos(lat0)."""
    # 1 degree = 6371.0088 * pi / 180 = 111.195 km; at lat0 = 60 a degree east is half that
    np.testing.assert_allclose(latlon_to_km(0.0, 1.0, 0.0, 0.0), [111.19508, 0.0], rtol=1e-6)
    np.testing.assert_allclose(latlon_to_km(1.0, 0.0, 0.0, 0.0), [0.0, 111.19508], rtol=1e-6)
    np.testing.assert_allclose(latlon_to_km(60.0, 1.0, 60.0, 0.0), [55.59754, 0.0], rtol=1e-6)
    assert latlon_to_km([0.0, 1.0], [1.0, 0.0], 0.0, 0.0).shape == (2, 2)
    with pytest.raises(ValueError, match="95"):
        latlon_to_km(95.0, 0.0, 0.0, 0.0)


def test_task_relevance_hand_worked():
    """Paper 4.3 eq. (2), a_t = |C_i ∩ C_j| / max(|C_i|, |C_j|); 0 if both empty."""
    assert task_relevance({1, 2, 3}, {2, 3}) == pytest.approx(2 / 3)
    assert task_relevance([1, 2], [1, 2]) == 1.0
    assert task_relevance(set(), set()) == 0.0
    assert task_relevance(set(), {1}) == 0.0


def test_model_affinity_hand_worked():
    """Paper 4.3 eq. (3), a_f = 1 / (1 + D)."""
    assert model_affinity(0.0) == 1.0
    assert model_affinity(1.0) == 0.5
    assert model_affinity(3.0) == 0.25
    with pytest.raises(ValueError, match="-1"):
        model_affinity(-1.0)


# --- the graph ---------------------------------------------------------------------------


def test_build_graph_two_nodes_hand_worked():
    """Paper 4.3, a_ij = a_s a_t a_f / sum_k(...): the worked example in build_graph's docstring."""
    # Prepare: V_A = [0.4, 0.2, 0.6], V_B = [0.4, 0.4, 0.4] -> z: [0, -1, 1], [0, 1, -1] -> D = sqrt(8)
    # a_s = exp(-25/50) = 0.60653, a_t = |{1}| / 2 = 0.5, a_f = 1 / (1 + 2.82843) = 0.26120 -> raw = 0.079214
    profiles = _two_node_profiles()
    # Execute
    g = build_graph(profiles, sigma_s=5.0)
    # Assert
    np.testing.assert_allclose(g.raw_vector[g.index["A"]], [0.4, 0.2, 0.6])
    np.testing.assert_allclose(g.vector[g.index["A"]], [0.0, -1.0, 1.0], atol=1e-12)
    assert g.classes[g.index["B"]] == (1,)
    assert g.position[g.index["B"]].tolist() == [3.0, 4.0]
    arc = _arc(g, "A", "B")
    assert arc["distance"] == pytest.approx(math.sqrt(8))
    assert arc["a_s"] == pytest.approx(0.6065307)
    assert arc["a_t"] == 0.5
    assert arc["a_f"] == pytest.approx(0.2612039)
    assert arc["raw"] == pytest.approx(0.0792141)
    assert arc["weight"] == _arc(g, "B", "A")["weight"] == 1.0


def test_build_graph_matches_numpy_reference():
    """Paper 4.3, the whole pipeline (V, z-score, D_weighted, a_s, a_t, a_f, normalisation) vs numpy."""
    # Prepare
    profiles = _four_node_profiles()
    class_weights = [1.0, 2.0, 0.5]
    nodes, raw, weight = _reference_weights(profiles, 2.0, class_weights)
    # Execute
    g = build_graph(profiles, sigma_s=2.0, class_weights=class_weights)
    # Assert: an arc exactly where raw > 0 (d shares no class with b), with the reference values
    for a, i in enumerate(nodes):
        for b, j in enumerate(nodes):
            arc = _arc(g, i, j)
            assert (arc is not None) == (raw[a, b] > 0)
            if arc is not None:
                assert arc["raw"] == pytest.approx(raw[a, b])
                assert arc["weight"] == pytest.approx(weight[a, b])
    assert _arc(g, "b", "d") is None
    for i in nodes:
        assert sum(_out_arcs(g, i).values()) == pytest.approx(1.0)


def test_build_graph_accepts_objects_and_config_weights():
    """Paper 4.3, w_k from config: class weight 0 removes a class from D_weighted."""
    # Prepare: as in the two-node example, but only class 0 counts: z-diffs [0, 2, -2], w = [1, 1, 0] -> D = 2
    profiles = {n: SimpleNamespace(**p) for n, p in _two_node_profiles().items()}
    # Execute
    g = build_graph(profiles, sigma_s=5.0, class_weights=[1.0, 0.0])
    # Assert
    assert _arc(g, "A", "B")["distance"] == pytest.approx(2.0)
    assert _arc(g, "A", "B")["a_f"] == pytest.approx(1 / 3)
    assert g.column_weights.tolist() == [1.0, 1.0, 0.0]


def test_build_graph_identical_ap_vectors():
    """Paper 4.3 eq. (3): identical performance vectors -> D = 0, a_f = 1 (all columns zero spread)."""
    profiles = {n: {"position": (0, 0), "classes": [0], "ap": [0.5, 0.3]} for n in (1, 2)}
    g = build_graph(profiles, sigma_s=1.0)
    assert _arc(g, 1, 2)["distance"] == 0.0
    assert _arc(g, 1, 2)["a_f"] == 1.0
    assert _arc(g, 1, 2)["raw"] == 1.0
    assert not np.isnan(g.vector[g.index[1]]).any()


def test_build_graph_nan_column_excluded_for_everyone():
    """Paper 4.3 D_weighted with absent classes: a column NaN for any model gets weight 0 in every distance."""
    # Prepare: class 1 is NaN for B only. Columns (mAP, c0, c1, c2):
    # V_A = [0.5333, 0.2, 0.9, 0.5], V_B = [0.45, 0.4, NaN, 0.5] -> z mAP [1, -1], c0 [-1, 1], c2 [0, 0]
    # -> D = sqrt(2^2 + 2^2 + 0) = sqrt(8), c1 ignored
    profiles = {
        "A": {"position": (0, 0), "classes": [0, 1, 2], "ap": [0.2, 0.9, 0.5]},
        "B": {"position": (0, 0), "classes": [0, 2], "ap": [0.4, NAN, 0.5]},
    }
    # Execute
    g = build_graph(profiles, sigma_s=1.0)
    # Assert
    assert g.column_weights.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert _arc(g, "A", "B")["distance"] == pytest.approx(math.sqrt(8))
    assert _arc(g, "A", "B")["weight"] == 1.0
    assert g.raw_vector[g.index["B"]][0] == pytest.approx(0.45)


def test_build_graph_one_node_and_empty():
    """Paper 4.3 with M = 1: a node, no arc, degree 0, no teacher; no profiles -> empty graph."""
    # Prepare / Execute
    g = build_graph({"solo": {"position": (0, 0), "classes": [0], "ap": [0.5]}}, sigma_s=1.0)
    degree = teacher_degree(g)
    # Assert
    assert g.nodes == ["solo"] and g.num_arcs == 0
    np.testing.assert_array_equal(g.vector[0], [0.0, 0.0])
    assert degree == {"solo": 0.0}
    assert select_teachers(degree, 1.0) == set()
    assert teachers_for(g, "solo", set()) == {}
    assert len(build_graph({}, sigma_s=1.0)) == 0


def test_isolated_node_by_min_weight():
    """Paper 4.3 one-hop neighbourhood: min_weight cuts a far node's arcs; it has degree 0 and no teacher."""
    # Prepare: far is 10 km away, sigma 1 -> a_s = exp(-50) ~ 2e-22 < 1e-6
    profiles = {
        "a": {"position": (0, 0), "classes": [0], "ap": [0.5]},
        "b": {"position": (0, 1), "classes": [0], "ap": [0.6]},
        "far": {"position": (10, 0), "classes": [0], "ap": [0.7]},
    }
    # Execute
    g = build_graph(profiles, sigma_s=1.0, min_weight=1e-6)
    degree = teacher_degree(g)
    teachers = select_teachers(degree, 0.5)
    # Assert
    assert _out_arcs(g, "far") == {} and not np.isin(g.index["far"], g.dst)
    assert degree["far"] == 0.0
    assert "far" not in teachers
    assert teachers_for(g, "far", teachers) == {}


def test_disjoint_classes_give_no_arc():
    """Paper 4.3 eq. (2) and Fig. 6: a node with a different task (a_t = 0) gets no arc even at min_weight 0."""
    profiles = {
        "a": {"position": (0, 0), "classes": [0, 1], "ap": [0.5, 0.5]},
        "b": {"position": (0, 0), "classes": [0], "ap": [0.6, 0.4]},
        "noisy": {"position": (0, 0), "classes": [], "ap": [0.1, 0.1]},
    }
    g = build_graph(profiles, sigma_s=1.0)
    degree_of = lambda graph, node: teacher_degree(graph)[node]  # noqa: E731
    assert _out_arcs(g, "noisy") == {} and degree_of(g, "noisy") == 0.0
    assert _arc(g, "a", "b") is not None


@pytest.mark.parametrize(
    ("profiles", "kwargs", "message"),
    [
        (
            {
                "a": {"position": (0, 0), "classes": [0], "ap": [0.5]},
                "b": {"position": (0, 0), "classes": [0], "ap": [0.5, 0.2]},
            },
            {},
            r"'a': 1, 'b': 2",
        ),
        ({"a": {"position": (0, 0), "classes": [0], "ap": [0.5]}}, {"sigma_s": 0.0}, "sigma_s.*0.0"),
        ({"a": {"position": (0, 0), "classes": [0], "ap": [0.5]}}, {"sigma_s": -3.0}, "sigma_s.*-3.0"),
        ({"a": {"position": (0, 0), "classes": [0]}}, {}, "node 'a' has no 'ap'"),
        ({"a": {"position": (0, 0, 1), "classes": [0], "ap": [0.5]}}, {}, "position of node 'a'"),
        ({"a": {"position": (0, 0), "classes": [0], "ap": [50.0]}}, {}, "node 'a'.*50.0"),
        ({"a": {"position": (0, 0), "classes": ["x"], "ap": [0.5]}}, {}, "node 'a'"),
        ({"a": {"position": (0, 0), "classes": [0], "ap": [0.5]}}, {"class_weights": [1, 1]}, "class_weights has 2"),
        ({"a": {"position": (0, 0), "classes": [0], "ap": [0.5]}}, {"class_weights": [-1]}, "-1"),
        ({"a": {"position": (0, 0), "classes": [0], "ap": [0.5]}}, {"min_weight": -0.5}, "min_weight.*-0.5"),
    ],
)
def test_build_graph_rejects_bad_input(profiles, kwargs, message):
    """Paper 4.3 inputs (V, p_i, C_i, sigma_s) are validated; the error names the bad node or value."""
    kwargs = {"sigma_s": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_graph(profiles, **kwargs)


# --- degree, teachers --------------------------------------------------------------------


def test_teacher_degree_hand_worked():
    """Paper 4.3 d_i, read as in-strength sum_j a_ji: the example in teacher_degree's docstring."""
    # Prepare: A->B 0.8, A->C 0.2, B->A 1, C->A 1
    g = _arcs_graph([("A", "B", 0.8), ("A", "C", 0.2), ("B", "A", 1.0), ("C", "A", 1.0)])
    # Execute / Assert: d_A = 1 + 1 = 2, d_B = 0.8, d_C = 0.2
    assert teacher_degree(g) == pytest.approx({"A": 2.0, "B": 0.8, "C": 0.2})


def test_teacher_degree_is_networkx_in_strength_and_literal_out_strength_is_degenerate():
    """Paper 4.3 d_i = sum_j a_ij: with one-hop normalised a_ij that out-strength is 1 for all; in-strength ranks."""
    # Prepare
    g = build_graph(_four_node_profiles(), sigma_s=2.0)
    # Execute
    degree = teacher_degree(g)
    literal = dict(_to_networkx(g).out_degree(weight="weight"))
    # Assert: independent reference = networkx weighted in-degree
    assert degree == pytest.approx(dict(_to_networkx(g).in_degree(weight="weight")))
    assert literal == pytest.approx({n: 1.0 for n in g.nodes})
    assert len({round(d, 9) for d in degree.values()}) == len(degree)
    assert sum(degree.values()) == pytest.approx(len(degree))


def test_select_teachers_hand_worked_and_ties():
    """Paper 4.3 top-rho teachers: count ceil(rho M), ties to the smaller id, at least one student."""
    degree = {"a": 2.0, "c": 1.0, "b": 1.0, "d": 0.5}
    assert select_teachers(degree, 0.5) == {"a", "b"}  # ceil(0.5 * 4) = 2; b beats c on id
    assert select_teachers(degree, 0.1) == {"a"}  # ceil(0.4) = 1
    assert select_teachers(degree, 1.0) == {"a", "b", "c"}  # M - 1 = 3: one student remains
    assert select_teachers(degree, 0.0) == set()


def test_select_teachers_rounding_and_degenerate_cases():
    """Paper 4.3 top-rho: float noise does not add a teacher; one node or zero degree -> no teacher."""
    # 0.3 * 10 = 3.0000000000000004 in floating point; ceil must still give 3
    degree = {k: float(10 - k) for k in range(10)}
    assert select_teachers(degree, 0.3) == {0, 1, 2}
    assert select_teachers({"solo": 1.0}, 0.5) == set()
    assert select_teachers({}, 0.5) == set()
    assert select_teachers({"a": 0.0, "b": 0.0}, 0.5) == set()
    assert select_teachers({"a": 0.0, "b": 1.0, "c": 0.0}, 1.0) == {"b"}  # degree-0 nodes never teach


@pytest.mark.parametrize(
    ("degree", "rho", "message"), [({"a": 1.0}, 1.5, "1.5"), ({"a": 1.0}, -0.1, "-0.1"), ({"a": NAN}, 0.5, "nan")]
)
def test_select_teachers_rejects_bad_input(degree, rho, message):
    """Paper 4.3 top-rho: rho outside [0, 1] or a non-finite degree is an error naming it."""
    with pytest.raises(ValueError, match=message):
        select_teachers(degree, rho)


def test_teachers_for_hand_worked():
    """Paper 4.3 "if its neighbor j is in T": the docstring example, weights renormalised to sum 1."""
    # Prepare: S->A 0.5, S->B 0.3, S->C 0.2, T = {A, B}, plus a teacher D that is not S's neighbour
    g = _arcs_graph([("S", "A", 0.5), ("S", "B", 0.3), ("S", "C", 0.2), ("A", "D", 1.0)])
    # Execute
    mixing = teachers_for(g, "S", {"A", "B", "D", "S"})
    # Assert: 0.5 / 0.8 = 0.625, 0.3 / 0.8 = 0.375; never S itself, never a non-neighbour
    assert mixing == pytest.approx({"A": 0.625, "B": 0.375})
    assert teachers_for(g, "C", {"A"}) == {}
    with pytest.raises(ValueError, match="'X'"):
        teachers_for(g, "X", {"A"})


def test_accuracy_weighted_degree_hand_worked():
    """Our addition to paper 4.3's degree: d_i * mAP_i (the docstring example); NaN mAP -> 0."""
    # Prepare: in-strengths A 2, B 0.8, C 0.2 (see test_teacher_degree_hand_worked)
    arcs = [("A", "B", 0.8), ("A", "C", 0.2), ("B", "A", 1.0), ("C", "A", 1.0)]
    g = _arcs_graph(arcs, {"A": 0.1, "B": 0.5, "C": 0.4})
    # Execute / Assert: 2 * 0.1 = 0.2, 0.8 * 0.5 = 0.4, 0.2 * 0.4 = 0.08
    score = accuracy_weighted_degree(g)
    assert score == pytest.approx({"A": 0.2, "B": 0.4, "C": 0.08})
    assert select_teachers(score, 0.3) == {"B"}  # the paper's in-strength alone would pick A
    assert select_teachers(teacher_degree(g), 0.3) == {"A"}
    g.raw_vector[g.index["B"]] = [NAN, NAN]
    assert accuracy_weighted_degree(g)["B"] == 0.0


def test_accuracy_weighted_degree_matches_numpy_on_a_built_graph():
    """d_i * mAP_i against an independent numpy product over networkx in-degrees and the profiles' nanmean."""
    profiles = _four_node_profiles()
    g = build_graph(profiles, sigma_s=2.0)
    score = accuracy_weighted_degree(g)
    in_deg = dict(_to_networkx(g).in_degree(weight="weight"))
    for node, p in profiles.items():
        assert score[node] == pytest.approx(in_deg[node] * np.nanmean(np.asarray(p["ap"], dtype=float)))


def test_teachers_for_better_only_drops_weaker_teachers():
    """Our addition: with better_only a student never learns from a teacher whose benchmark mAP is not above its own."""
    # Prepare: S (mAP 0.3) -> A 0.5 (mAP 0.6), B 0.3 (mAP 0.3, a tie), C 0.2 (mAP 0.1)
    arcs = [("S", "A", 0.5), ("S", "B", 0.3), ("S", "C", 0.2)]
    g = _arcs_graph(arcs, {"S": 0.3, "A": 0.6, "B": 0.3, "C": 0.1})
    # Execute / Assert
    assert teachers_for(g, "S", {"A", "B", "C"}) == pytest.approx({"A": 0.5, "B": 0.3, "C": 0.2})
    assert teachers_for(g, "S", {"A", "B", "C"}, better_only=True) == pytest.approx({"A": 1.0})
    assert teachers_for(g, "S", {"B", "C"}, better_only=True) == {}  # no better teacher: sits out
    assert teachers_for(g, "A", set(), better_only=True) == {}


def test_full_pipeline_every_student_weights_sum_to_one():
    """Paper 4.3 end to end: build, degree, top-rho teachers, per-student mixing weights."""
    g = build_graph(_four_node_profiles(), sigma_s=2.0)
    teachers = select_teachers(teacher_degree(g), 0.5)
    assert len(teachers) == 2
    for student in set(g.nodes) - teachers:
        mixing = teachers_for(g, student, teachers)
        assert set(mixing) <= teachers
        if mixing:
            assert sum(mixing.values()) == pytest.approx(1.0)


def test_graph_to_json_round_trips_with_nan():
    """Paper 4.3 graph snapshot: strict JSON (NaN -> null) with nodes, arcs, degrees and teachers."""
    # Prepare: class 1 absent for everyone
    profiles = {
        1: {"position": (0, 0), "classes": [0], "ap": [0.2, NAN]},
        2: {"position": (0, 1), "classes": [0], "ap": [0.4, NAN]},
        3: {"position": (1, 0), "classes": [0], "ap": [0.3, NAN]},
    }
    g = build_graph(profiles, sigma_s=1.0)
    degree = teacher_degree(g)
    teachers = select_teachers(degree, 0.3)
    # Execute
    snapshot = json.loads(json.dumps(graph_to_json(g, teachers, degree), allow_nan=False))
    # Assert
    assert snapshot["teachers"] == sorted(teachers)
    assert snapshot["column_weights"] == [1.0, 1.0, 0.0]
    assert len(snapshot["arcs"]) == g.num_arcs == 6
    node1 = snapshot["nodes"][0]
    assert node1["id"] == 1 and node1["raw_vector"] == [0.2, 0.2, None]
    assert node1["degree"] == pytest.approx(degree[1])
    assert {"source", "target", "raw", "weight", "a_s", "a_t", "a_f", "distance"} <= set(snapshot["arcs"][0])


def test_local_plan_every_node_learns_from_the_neighbours_ranked_above_it():
    """common.graph.local_plan, hand-checked: scores {A: 3, B: 2, C: 1}; arcs C->A 0.25, C->B 0.75, B->A 1.0,
    A->B 1.0 -> B learns from A (1.0), C from A and B (0.25, 0.75), A (the top) from nobody."""
    g = _arcs_graph([("C", "A", 0.25), ("C", "B", 0.75), ("B", "A", 1.0), ("A", "B", 1.0)])

    plan = graph_mod.local_plan(g, {"A": 3.0, "B": 2.0, "C": 1.0})

    assert plan == {"B": {"A": 1.0}, "C": {"A": 0.25, "B": 0.75}}
    # equal scores teach nobody; without arcs above it a node sits out
    assert graph_mod.local_plan(g, {"A": 1.0, "B": 1.0, "C": 1.0}) == {}


# --- the sparse graph: cut-offs, top-k, updates ------------------------------------------


def _random_profiles(n, side_km, seed=3):
    rng = np.random.default_rng(seed)
    return {f"s{k}": {"position": tuple(rng.uniform(0, side_km, 2)), "classes": set(rng.choice(6, 3, replace=False)),
                      "ap": rng.uniform(0.05, 0.95, 6)} for k in range(n)}


def test_sparse_graph_without_cuts_equals_the_dense_computation():
    """Paper 4.3 a_ij: the block computation keeps the dense path's arcs and values exactly (no cut-off, no top-k)."""
    profiles = _random_profiles(40, 30.0)
    dense = build_graph(profiles, 5.0, method="dense")
    sparse = build_graph(profiles, 5.0, cutoff_sigmas=0.0, top_k=0)
    assert dense.num_arcs == sparse.num_arcs > 0
    np.testing.assert_array_equal(sparse.src, dense.src)
    np.testing.assert_array_equal(sparse.dst, dense.dst)
    for key in ("raw", "a_s", "a_t", "a_f", "distance"):
        np.testing.assert_allclose(sparse.arcs[key], dense.arcs[key], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sparse.weight, dense.weight, rtol=1e-12)


def test_defaults_cut_nothing_on_the_default_site_circle():
    """The default cut-off (4 sigma) and top-k (32) keep every arc of 32 sites on a 5 km circle (sigma 5 km)."""
    from common.visdrone import site_positions

    rng = np.random.default_rng(0)
    profiles = {k: {"position": p, "classes": [0, 1], "ap": rng.uniform(0, 1, 2)}
                for k, p in enumerate(site_positions(32, 5.0))}
    dense, sparse = build_graph(profiles, 5.0, method="dense"), build_graph(profiles, 5.0)
    assert sparse.num_arcs == dense.num_arcs == 32 * 31
    np.testing.assert_allclose(sparse.weight, dense.weight, rtol=1e-12)


@pytest.mark.parametrize(("cutoff_sigmas", "top_k"), [(1.5, 0), (0.0, 4), (2.0, 3)])
def test_cut_off_and_top_k_keep_the_dense_values_on_the_arcs_kept(cutoff_sigmas, top_k):
    """Arcs kept: within cutoff_sigmas * sigma_s and among the top_k by raw; their raw equals the dense one and
    the weights are renormalised over what is kept (the numpy reference applies the same cuts)."""
    profiles = _random_profiles(30, 20.0)
    nodes, raw, weight = _reference_weights(profiles, 4.0, np.ones(6), cutoff_sigmas=cutoff_sigmas, top_k=top_k)
    dense = build_graph(profiles, 4.0, method="dense")

    g = build_graph(profiles, 4.0, cutoff_sigmas=cutoff_sigmas, top_k=top_k)

    assert g.num_arcs == int((raw > 0).sum()) < dense.num_arcs
    for e in range(g.num_arcs):
        a, b = g.src[e], g.dst[e]
        assert g.arcs["raw"][e] == pytest.approx(raw[a, b], rel=1e-12)
        assert g.weight[e] == pytest.approx(weight[a, b], rel=1e-12)
        assert g.arcs["raw"][e] == pytest.approx(_arc(dense, nodes[a], nodes[b])["raw"], rel=1e-12)
    if top_k:
        assert np.bincount(g.src).max() == top_k
    if cutoff_sigmas:
        pos = g.position
        assert np.sqrt(((pos[g.src] - pos[g.dst]) ** 2).sum(axis=1)).max() <= cutoff_sigmas * 4.0


def test_top_k_ties_go_to_the_lower_node_index():
    """Four identical nodes: every raw is 1; with top_k 2 each keeps the two lowest-index others, weights 1/2."""
    profiles = {k: {"position": (0, 0), "classes": [0], "ap": [0.5]} for k in range(4)}
    g = build_graph(profiles, 1.0, top_k=2)
    assert {n: sorted(_out_arcs(g, n)) for n in g.nodes} == {0: [1, 2], 1: [0, 2], 2: [0, 1], 3: [0, 1]}
    assert set(g.weight.tolist()) == {0.5}


def test_update_graph_equals_a_rebuild_when_the_statistics_stay():
    """Swapping two nodes' AP vectors and moving a third keeps every column's mean and std, so the rows-only
    update must give exactly the graph build_graph gives over the new profiles; it recomputes fewer rows."""
    profiles = _random_profiles(60, 40.0)
    g = build_graph(profiles, 5.0, top_k=5)
    changed = {"s0": {**profiles["s0"], "ap": profiles["s1"]["ap"]},
               "s1": {**profiles["s1"], "ap": profiles["s0"]["ap"]},
               "s2": {**profiles["s2"], "position": (1.0, 2.0)}}

    updated = update_graph(g, changed)

    fresh = build_graph({**profiles, **changed}, 5.0, top_k=5)
    assert 3 <= updated.rows_computed < len(g) == fresh.rows_computed
    np.testing.assert_array_equal(updated.src, fresh.src)
    np.testing.assert_array_equal(updated.dst, fresh.dst)
    np.testing.assert_allclose(updated.weight, fresh.weight, rtol=1e-12)
    np.testing.assert_allclose(updated.arcs["raw"], fresh.arcs["raw"], rtol=1e-12)


def test_update_graph_with_new_and_removed_nodes_keeps_the_old_statistics():
    """A new node and a removed one: rows are z-scored with the graph's statistics (numpy reference with them)."""
    profiles = _random_profiles(50, 40.0)
    g = build_graph(profiles, 5.0, top_k=6)
    newcomer = _random_profiles(1, 40.0, seed=11)["s0"]

    updated = update_graph(g, {"new": newcomer}, removed=["s7"], renorm_tol=math.inf)

    current = {k: p for k, p in profiles.items() if k != "s7"} | {"new": newcomer}
    nodes, raw, weight = _reference_weights(current, 5.0, np.ones(6), stats=(g.mean, g.std), cutoff_sigmas=4.0,
                                            top_k=6)
    assert updated.nodes == nodes and updated.rows_computed < len(nodes)
    assert updated.num_arcs == int((raw > 0).sum())
    np.testing.assert_allclose(updated.weight, weight[updated.src, updated.dst], rtol=1e-12)
    np.testing.assert_array_equal(updated.mean, g.mean)


def test_update_graph_rebuilds_when_the_statistics_move():
    """One of three nodes changes a lot: the column statistics move beyond renorm_tol, so every row is rebuilt."""
    profiles = {k: {"position": (k, 0), "classes": [0], "ap": [0.2 + 0.1 * k]} for k in range(3)}
    g = build_graph(profiles, 5.0)
    changed = {2: {"position": (2, 0), "classes": [0], "ap": [0.9]}}

    updated = update_graph(g, changed)

    fresh = build_graph({**profiles, **changed}, 5.0)
    assert updated.rows_computed == 3
    np.testing.assert_allclose(updated.mean, fresh.mean)
    np.testing.assert_allclose(updated.weight, fresh.weight)


@pytest.mark.parametrize(("kwargs", "message"), [({"removed": ["zz"]}, "'zz'"), ({"renorm_tol": -1.0}, "-1.0")])
def test_update_graph_rejects_bad_input(kwargs, message):
    g = build_graph(_two_node_profiles(), 5.0)
    with pytest.raises(ValueError, match=message):
        update_graph(g, {}, **kwargs)


@pytest.mark.parametrize(("kwargs", "message"),
                         [({"top_k": -1}, "top_k.*-1"), ({"cutoff_sigmas": -2.0}, "cutoff_sigmas.*-2.0"),
                          ({"method": "fast"}, "'fast'")])
def test_build_graph_rejects_bad_sparse_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_graph(_two_node_profiles(), 5.0, **kwargs)


def test_teacher_plan_hand_worked_equals_teachers_for_per_student():
    """teacher_plan: every student's teachers_for at once (the docstring example)."""
    g = _arcs_graph([("S", "A", 0.5), ("S", "B", 0.3), ("S", "C", 0.2), ("C", "A", 1.0), ("A", "B", 1.0)])
    plan = teacher_plan(g, {"A", "B"})
    assert plan.keys() == {"S", "C"}
    assert plan["S"] == pytest.approx({"A": 0.625, "B": 0.375}) and plan["C"] == {"A": 1.0}
    for student, mixing in plan.items():
        assert mixing == pytest.approx(teachers_for(g, student, {"A", "B"}))


def test_collab_graph_rejects_arcs_outside_the_nodes():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        CollabGraph(["a", "b"], [0], [5], [1.0])
