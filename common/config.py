"""Typed configuration: ``conf/*.yaml`` merged over a dataclass schema.

Resolution order (later wins)::

    schema defaults  <  conf/base.yaml  <  conf/<preset>.yaml  <  overrides

``overrides`` come from Flower's run config (``--run-config``) or the command
line, as dotted keys; kebab-case is accepted (``federation.num-rounds=5``).
A misspelled key or a value of the wrong type fails at start with a
:class:`ConfigError` naming the key.

Only entry points call :func:`load_config`; every component takes plain
keyword arguments (detectron2's ``from_config`` pattern).
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.protocol import KD_SELECTIONS
from common.routing import BUDGET_FORMS, OFFLOAD_MODES, parse_budget

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""


@dataclass
class DataConfig:
    """Where the sites' data comes from.

    ``source: builtin`` generates the procedural benchmark (``common.benchmark``)
    into ``cache_dir``; ``source: yolo`` uses ``site_data`` (one Ultralytics
    ``data.yaml`` per site, e.g. from ``python -m common.visdrone``) and
    ``public_data`` (the shared benchmark's ``data.yaml``).
    """

    source: str = "builtin"
    cache_dir: str = "~/.cache/cedar/benchmark"
    seed: int = 0
    num_sites: int = 4
    imgsz: int = 320
    train_per_site: int = 96
    val_per_site: int = 24
    test_per_site: int = 24
    public_per_site: int = 16
    public_train_per_site: int = 32
    objects_per_image: list[int] = field(default_factory=lambda: [4, 12])
    # object side length in px at ``imgsz``: small objects are drawn in
    # [small_px[0], small_px[1]], the rest in [large_px[0], large_px[1]]
    small_px: list[int] = field(default_factory=lambda: [4, 12])
    large_px: list[int] = field(default_factory=lambda: [16, 32])
    small_fraction: float = 0.75
    occlusion_prob: float = 0.15
    clutter_per_image: list[int] = field(default_factory=lambda: [6, 16])
    noise_std: float = 14.0
    # opacity range of the drawn objects: lower is harder (objects blend into the ground)
    contrast: list[float] = field(default_factory=lambda: [0.4, 0.85])
    classes_per_site: int = 5
    video_frames: int = 60
    noisy_site: bool = False
    # sites 2k and 2k+1 of the same kind (classes, domain, size mix), see common.benchmark.make_sites
    similar_pairs: bool = False
    site_spacing_km: float = 2.0
    # source: yolo
    site_data: list[str] = field(default_factory=list)
    site_positions_km: list[list[float]] = field(default_factory=list)
    # each site's unlabelled frames (a video file or an image folder; "" none), in site_data's order; the
    # built-in benchmark uses each site's video. A SuperNode names its own with node-config ``unlabelled``
    unlabelled: list[str] = field(default_factory=list)
    public_data: str = ""


MODEL_INITS = {"edge_init": ("base", "scratch"), "cloud_init": ("train",)}


@dataclass
class ModelConfig:
    """``edge``/``cloud``: an Ultralytics model name (``yolo11n``) or a YAML in ``conf/models``.

    ``edge_init``: every site's first model: ``base`` (the server trains ``edge`` for
    ``base_epochs`` on the shared benchmark's public train split, cached), ``scratch``
    (random weights) or a checkpoint path (an Ultralytics ``.pt`` or a cedar weights file).
    ``cloud_init``: ``train`` (``cloud`` trained for ``cloud_epochs`` the same way, cached)
    or a checkpoint path. See :mod:`server.models`.
    """

    edge: str = "yolo11n"
    cloud: str = "yolo11s"
    edge_init: str = "base"
    cloud_init: str = "train"
    base_epochs: int = 20
    cloud_epochs: int = 10


@dataclass
class CloudConfig:
    """The cloud detection service inside a run (``server.cloud_process``).

    ``serve``: the ServerApp runs ``python -m server.cloud`` on loopback with the cloud
    model and tells the sites its URL and token in every train message. ``store``: the
    hard-sample store (default ``<run>/cloud/hard-samples``; a separately deployed
    service's ``--store`` when ``serve`` is off). Before each cloud-to-edge KD round the
    cloud model is fine-tuned for ``finetune_epochs`` on the public train split plus the
    hard samples the store gained (0: never; the paper's closed loop, section 4.2 (2)).
    """

    serve: bool = True
    store: str = ""
    finetune_epochs: int = 2
    startup_timeout_s: float = 120.0


@dataclass
class TrainConfig:
    epochs_per_round: int = 2
    batch: int = 8
    imgsz: int = 320
    lr0: float = 0.01  # AdamW peak learning rate of a site's first round (a model built from scratch)
    # ... and of every later round, which continues the site's trained model: 0.01 there undoes much of what
    # the model knew (benchmarks/results/finetune_lr.md) and drowns any distillation effect in that noise
    finetune_lr0: float = 0.002
    weight_decay: float = 0.0005
    warmup_iters: int = 20
    mosaic: float = 1.0
    workers: int = 0
    device: str = "cpu"
    threads: int = 2
    # probability that a training image gets a random adverse condition (common.adverse); 0: off
    adverse_p: float = 0.0


@dataclass
class EvalConfig:
    batch: int = 16
    conf: float = 0.001
    iou: float = 0.7
    small_px: int = 16


@dataclass
class RoutingConfig:
    """Cloud-edge collaboration (paper section 4.2): every threshold and choice of the collaboration step.

    The one place of their names and defaults: the edge runtime (``clients.edge``, its CLI defaults),
    the ClientApp's collaboration metrics and the benchmarks build their settings from it
    (``clients.collab.CollabSettings.from_config``); the cloud service's CLI reads ``cloud_conf``,
    ``label_conf`` and ``crop_zoom`` from it.
    """

    det_conf: float = 0.25  # the edge's answer: its boxes from this confidence on
    # the edge also detects down to this confidence (0: off); boxes below det_conf are candidates: not in its
    # answer, offloaded, kept only where the cloud confirms them (clients.edge --candidate-conf). With crops they
    # cover what the edge nearly missed: collaboration.md, crops at 0.05 vs whole keyframes
    candidate_conf: float = 0.05
    t_conf: float = 0.5  # below: ambiguous (low confidence)
    t_size: float = 256.0  # box area in px^2 below: ambiguous (small)
    n_frames: int = 5  # keyframes over which an intermittent track is ambiguous (videos)
    # the cloud detection service (server/cloud.py) for the collaborative metrics; node-config keys
    # cloud-url / cloud-token-file / cloud-cafile override these per node. Empty: edge metrics only.
    cloud_url: str = ""
    cloud_token_file: str = ""
    cloud_cafile: str = ""
    # what a keyframe sends (common.routing.OFFLOAD_MODES): "none" (the edge alone), "crops" (around the ambiguous
    # boxes and the candidates, with context), "frame" (the whole keyframe when anything is ambiguous, merged) or
    # "cloud" (the whole keyframe always, the cloud's answer alone): benchmarks/results/collaboration.md. With a
    # budget and a model that measured its options, the budget's choice replaces offload, t_conf, candidate_conf and
    # jpeg_quality
    offload: str = "crops"
    # what a site may spend on offloading (common.routing.parse_budget): "bytes:N" upload bytes per frame,
    # "frame:F" that as a share of the whole keyframe's JPEG, "recall:R" the cheapest option reaching recall R, or
    # "" (the settings above as they are). Each round a site measures every option on its validation split
    # (clients.collab.OFFLOAD_GRID), stores the measurements with its model, and the budget picks one
    # (common.routing.choose_offload): benchmarks/results/offload_budget.md
    budget: str = "frame:0.25"
    context: float = 0.5  # crop margin per side, as a fraction of the box
    min_crop: int = 32  # minimum crop side in px
    jpeg_quality: int = 90
    atlas: bool = True  # a keyframe's crops on one JPEG (false: one JPEG per crop)
    merge_iou: float = 0.5  # an edge and a cloud box overlapping this much are one object
    # merge keeps offloaded edge boxes that no cloud box overlaps: higher collaborative mAP50 and recall on every
    # seed with crops (benchmarks/results/reproduce_standard.md, collaboration.md); false: the paper's merge
    keep_unanswered: bool = True
    # overlaps of edge and cloud boxes: "fuse" (one box, noisy-or confidence: edge and cloud as an ensemble) or
    # "cloud" (the cloud's box wins, the paper's); fuse >= cloud on every site measured (collaboration.md)
    merge: str = "fuse"
    # the cloud service answers from cloud_conf on (the edge fuses its less sure boxes too: at 0.15 instead of 0.25
    # the collaboration's FNR fell on every site of collaboration.md); its hard-sample store keeps only boxes from
    # label_conf on (cloud->edge KD trains on them); crops are detected crop_zoom times their size
    cloud_conf: float = 0.15
    label_conf: float = 0.25
    crop_zoom: float = 2.0


@dataclass
class FederationConfig:
    num_rounds: int = 3
    # "none": every site keeps its own (personalised) model; "fedavg": average
    aggregation: str = "none"
    wait_for_nodes_s: float = 120.0
    reply_timeout_s: float = 3600.0
    # continue the run in output_dir/run_name from its last completed round
    resume: bool = False
    # sites (indices, negative from the end: -1 is the last) that join the federation at late_join_round: they get
    # no train message before it, and the graph maintenance evaluates them as "new" when they first reply
    late_sites: list[int] = field(default_factory=list)
    late_join_round: int = 2
    # a site id is bound to the first node id that presents it (run folder: bindings.json); another node claiming it is
    # refused. "connected": the binding moves to a new node once its node is no longer connected (SuperNodes without
    # authentication get a new node id at each start); "strict": never (authenticated SuperNodes keep their node id)
    site_binding: str = "connected"
    # sites whose binding a resumed run releases at its start: the next node that claims one is bound to it
    release_sites: list[str] = field(default_factory=list)
    # the share of the sites with a model that trains each round, in turn (strategies.personalized
    # .PersonalizedStrategy.sample_nodes): every site trains once every ceil(1 / fraction_train) rounds, a new or
    # joining site at once. 1: every site every round
    fraction_train: float = 1.0
    # the simulation engine (cedar-simulate, Flower's Ray backend): each simulated ClientApp reserves client_cpus
    # CPUs (0: train.threads, the threads it trains with) and client_gpus GPUs (a share: 0.5 puts two on a GPU),
    # and Ray uses sim_cpus CPUs in all (0: every CPU of the machine), so sim_cpus // client_cpus ClientApps train
    # at once (a 32-site round's peak memory: benchmarks/results/scale.md)
    client_cpus: int = 0
    client_gpus: float = 0.0
    sim_cpus: int = 0


@dataclass
class KDConfig:
    """Knowledge distillation between sites (paper section 4.3) and from the cloud model.

    ``mode``: ``none`` (local training only), ``graph`` (top-rho teachers by the
    similarity graph), ``all`` (naive: every other site teaches every site,
    uniform weights; the paper's Figure 6 baseline). ``cloud_rounds``: rounds
    on which the cloud model (trained by the server) teaches every site.
    ``teacher_rank``: ``map_degree`` (default: in-strength x benchmark mAP) or
    ``degree`` (the paper's in-strength alone); ``better_only``: a student learns
    only from teachers with a higher benchmark mAP (see ``common.graph``);
    ``student_check``: the student keeps only the teachers that beat it on its own
    validation split (see ``clients.site.LocalSite.distiller``). Distillation runs
    inside a round's local epochs (``train.epochs_per_round``), from the teachers'
    models of the round before. The cloud model is ``model.cloud-init`` (see :class:`CloudConfig` for how the
    hard samples reach it).
    """

    mode: str = "none"
    rho: float = 0.3
    teacher_rank: str = "map_degree"
    teacher_scope: str = "global"  # "global": the paper's top-rho set; "local": common.graph.local_plan
    better_only: bool = True
    student_check: bool = True
    check_margin: float = 0.05  # by how much (val mAP50) a teacher must beat the student to be kept
    sigma_s_km: float = 5.0
    min_weight: float = 0.0
    class_weights: str = "ones"  # "ones" or "small" (small-object emphasis)
    alpha: float = 0.5  # weight of the detection loss: alpha * det + (1 - alpha) * kd
    temperature: float = 1.0  # paper section 5.1
    fg_threshold: float = 0.25
    # anchors distilled on (common.kd.detection_kd_loss): "teacher-fg", the paper's soft labels on the teacher's
    # foreground; "teacher-better", only where the teacher is closer to the student's own labels than the student.
    # select: edge teachers (peers of the student's own level, benchmarks/results/reproduce_*.md);
    # cloud_select: a student whose teachers include the cloud model (stronger everywhere)
    select: str = "teacher-better"
    cloud_select: str = "teacher-fg"
    start_round: int = 2  # teachers need a round of local training before they know anything
    cloud_rounds: list[int] = field(default_factory=list)
    # the KD transfer set (clients.site.LocalSite.transfer_set): up to unlabelled_frames of the site's unlabelled
    # frames join its labelled images, with pseudo-labels from its teachers at pseudo_conf (common.kd.pseudo_labels);
    # 0: the labelled images only. The frames never leave the site
    unlabelled_frames: int = 0
    pseudo_conf: float = 0.3
    # a joining site's starting weights when the new-node rule gives it teachers: "teacher" (its top edge teacher's
    # model; strategies.graph_kd.GraphKDStrategy.joining_start) or "base" (what every site starts from). "teacher"
    # beats "base" for a joining site at every L of benchmarks/results/new_site.md, on both new sites
    new_node_init: str = "teacher"
    # graph maintenance (paper Figure 4); each site is re-evaluated once every t_cycle rounds (1/t_cycle per round)
    t_cycle: int = 1
    delta_down: float = 0.05
    patience: int = 2
    # sparse graph (common.graph.build_graph): arcs within graph_cutoff_sigmas * sigma_s_km (0: no cut-off), at
    # most graph_top_k per site (0: all); rows-only updates until a column's mean/std moves by graph_renorm_tol std
    graph_top_k: int = 32
    graph_cutoff_sigmas: float = 4.0
    graph_renorm_tol: float = 0.02


@dataclass
class ReproduceConfig:
    """The budget of ``python -m benchmarks.reproduce`` (paper Tables 1-4, Figures 5-8).

    Its own, smaller than a preset's federation, so that the ``standard`` preset's
    reproduction fits 90 minutes on 2 CPU cores: ``workers`` jobs at a time (one torch
    thread each on CPU); federations of ``num_sites`` sites (one similar pair; 0 = the
    preset's ``data.num-sites``) whose round 1 (``base_epochs`` local epochs, no KD) is
    trained once per seed and shared by every variant, then ``num_rounds - 1`` rounds of
    ``epochs_per_round`` epochs with KD (edge and cloud); one cloud model trained for
    ``cloud_iters`` times one site's edge iterations.
    """

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    num_sites: int = 2
    num_rounds: int = 2
    base_epochs: int = 8
    epochs_per_round: int = 3
    cloud_iters: float = 2.0
    workers: int = 2
    t_conf_sweep: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7])


@dataclass
class TrackingConfig:
    # "off", "offline" (default, files under the run folder) or "online"
    wandb: str = "offline"
    project: str = "cedar"


@dataclass
class CedarConfig:
    preset: str = "quick"
    seed: int = 0
    output_dir: str = "outputs"
    run_name: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    reproduce: ReproduceConfig = field(default_factory=ReproduceConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


_CHOICES = {
    "data.source": ("builtin", "yolo"),
    "federation.aggregation": ("none", "fedavg"),
    "kd.mode": ("none", "graph", "all"),
    "kd.teacher_rank": ("map_degree", "degree"),
    "kd.teacher_scope": ("global", "local"),
    "kd.select": KD_SELECTIONS,
    "kd.cloud_select": KD_SELECTIONS,
    "kd.new_node_init": ("base", "teacher"),
    "routing.offload": OFFLOAD_MODES,
    "routing.merge": ("cloud", "fuse"),
    "kd.class_weights": ("ones", "small"),
    "tracking.wandb": ("off", "offline", "online"),
}


def _snake(key: str) -> str:
    return key.replace("-", "_")


def _merge(base, update: Any, what: str):
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        if not key and isinstance(update, Mapping):  # e.g. a scalar over a whole section
            key = ", ".join(str(k) for k in update)
        raise ConfigError(f"{what}: bad config key or value '{key or '?'}': {err.msg or err}") from None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = OmegaConf.load(path)
    return data


def parse_overrides(overrides: Mapping[str, Any] | None) -> dict:
    """Turn flat dotted (kebab- or snake-case) keys into a nested dict."""
    nested: dict = {}
    for dotted, value in (overrides or {}).items():
        parts = [_snake(p) for p in str(dotted).split(".")]
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{dotted}' conflicts with another override")
        node[parts[-1]] = value
    return nested


def load_config(
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    conf_dir: Path | str = CONF_DIR,
) -> CedarConfig:
    """Resolve the configuration and validate it.

    Parameters
    ----------
    preset : one of ``quick``, ``standard``, ``paper`` or the stem of another
        YAML file in ``conf_dir``; default: the ``preset`` override or ``quick``.
    overrides : flat mapping of dotted keys (``"train.epochs-per-round": 3``).
    """
    nested = parse_overrides(overrides)
    preset = preset or nested.pop("preset", None) or "quick"
    nested.pop("preset", None)
    conf_dir = Path(conf_dir)
    cfg = OmegaConf.structured(CedarConfig)
    cfg = _merge(cfg, _read_yaml(conf_dir / "base.yaml"), "conf/base.yaml")
    preset_file = conf_dir / f"{preset}.yaml"
    if not preset_file.is_file():
        known = sorted(p.stem for p in conf_dir.glob("*.yaml") if p.stem != "base")
        raise ConfigError(f"unknown preset '{preset}' (known: {', '.join(known)})")
    cfg = _merge(cfg, _read_yaml(preset_file), f"conf/{preset}.yaml")
    cfg = _merge(cfg, OmegaConf.create(nested), "overrides")
    cfg.preset = preset
    result: CedarConfig = OmegaConf.to_object(cfg)
    validate(result)
    return result


def validate(cfg: CedarConfig) -> None:
    """Check value ranges and choices that a type alone cannot express."""
    flat = to_flat_dict(cfg)
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}={flat[key]!r}: expected one of {choices}")
    positive = [
        "data.num_sites", "data.imgsz", "data.train_per_site", "data.val_per_site",
        "data.test_per_site", "data.public_per_site", "data.classes_per_site",
        "train.batch", "train.imgsz", "train.lr0", "train.finetune_lr0", "eval.batch", "federation.num_rounds",
    ]
    for key in positive:
        if flat[key] <= 0:
            raise ConfigError(f"{key}={flat[key]!r}: must be > 0")
    for key in ("train.epochs_per_round", "model.base_epochs", "model.cloud_epochs", "cloud.finetune_epochs"):
        if flat[key] < 0:
            raise ConfigError(f"{key}={flat[key]!r}: must be >= 0")
    for key in ("kd.graph_top_k", "kd.graph_cutoff_sigmas", "kd.graph_renorm_tol", "kd.unlabelled_frames"):
        if flat[key] < 0:
            raise ConfigError(f"{key}={flat[key]!r}: must be >= 0")
    for key in ("kd.t_cycle", "kd.patience", "reproduce.num_rounds", "reproduce.workers", "federation.late_join_round"):
        if flat[key] < 1:
            raise ConfigError(f"{key}={flat[key]!r}: must be >= 1")
    if flat["kd.temperature"] <= 0 or flat["kd.sigma_s_km"] <= 0:
        raise ConfigError(f"kd.temperature={flat['kd.temperature']!r} and kd.sigma_s_km={flat['kd.sigma_s_km']!r}"
                          " must be > 0")
    for key in ("data.small_fraction", "data.occlusion_prob", "train.mosaic", "train.adverse_p", "kd.rho", "kd.alpha",
                "kd.fg_threshold", "kd.check_margin", "kd.pseudo_conf", "routing.det_conf", "routing.t_conf"):
        if not 0.0 <= flat[key] <= 1.0:
            raise ConfigError(f"{key}={flat[key]!r}: must be in [0, 1]")
    for key in ("federation.client_cpus", "federation.client_gpus", "federation.sim_cpus"):
        if flat[key] < 0:
            raise ConfigError(f"{key}={flat[key]!r}: must be >= 0")
    if not 0.0 < flat["federation.fraction_train"] <= 1.0:
        raise ConfigError(f"federation.fraction_train={flat['federation.fraction_train']!r}: must be in (0, 1]")
    if flat["routing.candidate_conf"] and not 0.0 < flat["routing.candidate_conf"] < flat["routing.det_conf"]:
        raise ConfigError(f"routing.candidate_conf={flat['routing.candidate_conf']!r}: must be 0 (off) or in "
                          f"(0, routing.det_conf={flat['routing.det_conf']!r})")
    try:
        parse_budget(flat["routing.budget"])
    except ValueError:
        raise ConfigError(f"routing.budget={flat['routing.budget']!r}: expected {BUDGET_FORMS}") from None
    if not (len(flat["data.contrast"]) == 2 and 0 < flat["data.contrast"][0] <= flat["data.contrast"][1] <= 1):
        raise ConfigError(f"data.contrast={flat['data.contrast']!r}: expected [low, high] with 0 < low <= high <= 1")
    for key in ("data.objects_per_image", "data.small_px", "data.large_px", "data.clutter_per_image"):
        pair = flat[key]
        if len(pair) != 2 or pair[0] > pair[1] or pair[0] < 0:
            raise ConfigError(f"{key}={pair!r}: expected [low, high] with 0 <= low <= high")
    for key, choices in MODEL_INITS.items():
        if not getattr(cfg.model, key):
            raise ConfigError(f"model.{key}='': expected one of {choices} or a checkpoint path")
    if cfg.model.cloud_init == "train" and cfg.model.cloud_epochs == 0 and (cfg.cloud.serve or cfg.kd.cloud_rounds):
        raise ConfigError("model.cloud_epochs=0 with model.cloud_init='train': the cloud model needs training")
    if cfg.data.source == "yolo":
        if not cfg.data.site_data:
            raise ConfigError("data.site_data: needs one data.yaml per site when data.source=yolo")
        if not cfg.data.public_data:
            raise ConfigError("data.public_data: needs the shared benchmark's data.yaml when data.source=yolo")
        if len(cfg.data.unlabelled) > len(cfg.data.site_data):
            raise ConfigError(f"data.unlabelled={list(cfg.data.unlabelled)!r}: names {len(cfg.data.unlabelled)} "
                              f"sources for {len(cfg.data.site_data)} sites (one per site_data entry, '' for none)")
    n = len(cfg.data.site_data) if cfg.data.source == "yolo" else cfg.data.num_sites
    bad = [i for i in flat["federation.late_sites"] if not -n <= i < n]
    if bad or len({i % n for i in flat["federation.late_sites"]}) != len(flat["federation.late_sites"]):
        raise ConfigError(f"federation.late_sites={flat['federation.late_sites']!r}: expected distinct site indices "
                          f"in [-{n}, {n}) (the config has {n} sites)")


def model_init_path(cfg: CedarConfig, key: str) -> Path | None:
    """The checkpoint ``model.<key>`` names (``edge_init``/``cloud_init``), or None for a keyword.

    Raises :class:`ConfigError` naming the key and the path when the file does not exist;
    called where the file is read (the server), not in :func:`validate`, which sites run too.
    """
    value = getattr(cfg.model, key)
    if value in MODEL_INITS[key]:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.{key}={value!r}: no such file {path} (or one of {MODEL_INITS[key]})")
    return path


def to_flat_dict(cfg: CedarConfig) -> dict[str, Any]:
    """``{"data.imgsz": 320, ...}``: dotted snake-case keys."""
    out: dict[str, Any] = {}

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = value

    walk(cfg, "")
    return out


def to_yaml(cfg: CedarConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: CedarConfig, path: Path | str) -> Path:
    """Write the resolved config (as loaded, all keys) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def parse_value(text: str) -> Any:
    """A command-line value: ``[..]`` is a YAML list, anything else stays a string.

    The typed schema converts strings to int/float/bool itself, and keeping
    strings avoids YAML 1.1 surprises (``off`` would become ``False``).
    """
    text = text.strip()
    if text.startswith("["):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"override value {text!r} is not a valid list") from None
    return text


def from_run_config(run_config: Mapping[str, Any]) -> CedarConfig:
    """Resolve the config from Flower's run config.

    ``preset`` picks the YAML preset; ``overrides`` is a space-separated list
    of ``dotted.key=value`` pairs (``"federation.num-rounds=5 train.batch=4"``);
    any other key is itself a dotted override.
    """
    run_config = dict(run_config)
    preset = str(run_config.pop("preset", "") or "") or None
    overrides: dict[str, Any] = {}
    text = str(run_config.pop("overrides", "") or "")
    for item in shlex.split(text):
        if "=" not in item:
            raise ConfigError(f"overrides: '{item}' is not key=value")
        key, _, value = item.partition("=")
        overrides[key] = parse_value(value)
    overrides.update(run_config)
    return load_config(preset, overrides)
