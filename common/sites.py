"""Which site a node is, and where its data and the shared benchmark live.

A node's identity comes from its Flower ``node-config``:

- simulation: ``partition-id`` (set by Flower) selects site ``partition-id``;
- deployment: ``site-index`` (and optionally ``data-path``, ``unlabelled``, ``position-km``
  as ``"x,y"``, ``site-id``) given with ``flower-supernode --node-config``.

Both the built-in benchmark (``data.source: builtin``) and user datasets
(``data.source: yolo``: one Ultralytics ``data.yaml`` per site, e.g. written by
``python -m common.visdrone``) resolve to the same :class:`SiteSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from common.config import CedarConfig, ConfigError
from common.detections import label_path, read_yolo_labels


@dataclass(frozen=True)
class SiteSpec:
    index: int
    site_id: str
    position_km: tuple[float, float]
    classes: tuple[int, ...]
    data_yaml: Path
    unlabelled: Path | None = None  # the site's unlabelled frames: a video file or an image folder


def class_names(data_yaml: str | Path) -> list[str]:
    """Class names of an Ultralytics data.yaml (``names`` as a list or an id map)."""
    path = Path(data_yaml)
    if not path.is_file():
        raise ConfigError(f"dataset file not found: {path}")
    names = yaml.safe_load(path.read_text()).get("names")
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise ConfigError(f"{path}: 'names' must list the class names")


def split_images(data_yaml: Path, split: str):
    """``(path, BGR image, gt)`` for each readable image of a split of an Ultralytics data.yaml, in name order;
    ``gt``: ``(M, 5)`` pixel rows ``cls, x1, y1, x2, y2``."""
    import cv2

    from common.detections import image_labels

    for path in sorted(split_dir(data_yaml, split).glob("*.*")):
        image = cv2.imread(str(path))
        if image is not None:
            yield path, image, image_labels(path, image.shape[1], image.shape[0])


def split_dir(data_yaml: Path, split: str) -> Path:
    """The image folder of a split of an Ultralytics data.yaml."""
    cfg = yaml.safe_load(Path(data_yaml).read_text())
    root = Path(cfg.get("path") or Path(data_yaml).parent)
    folder = cfg.get(split)
    if not isinstance(folder, str):
        raise ConfigError(f"{data_yaml}: '{split}' must be one folder")
    return root / folder


def _label_classes(data_yaml: Path) -> tuple[int, ...]:
    """Class ids present in the train labels of a YOLO dataset."""
    labels = label_path(split_dir(data_yaml, "train") / "x").parent
    found = {int(c) for txt in labels.rglob("*.txt") for c in read_yolo_labels(txt)[:, 0]}
    return tuple(sorted(found))


def num_sites(cfg: CedarConfig) -> int:
    """How many sites (and so simulated SuperNodes) the config describes."""
    if cfg.data.source == "builtin":
        return cfg.data.num_sites + int(cfg.data.noisy_site)
    return len(cfg.data.site_data)


def public_data(cfg: CedarConfig) -> Path:
    """The shared labelled benchmark every edge model is evaluated on (server side)."""
    if cfg.data.source == "builtin":
        from common.benchmark import benchmark_from_config

        return benchmark_from_config(cfg.data).public_data
    return Path(cfg.data.public_data).expanduser()


def _parse_position(value: Any, where: str) -> tuple[float, float]:
    try:
        parts = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        parts = []
    if len(parts) != 2:
        raise ConfigError(f"{where}={value!r}: expected 'x_km,y_km'")
    return parts[0], parts[1]


def resolve_site(cfg: CedarConfig, node_config: Mapping[str, Any]) -> SiteSpec:
    """The :class:`SiteSpec` of the node described by ``node_config``."""
    key = "site-index" if "site-index" in node_config else "partition-id"
    if key not in node_config:
        raise ConfigError("node-config needs 'site-index' (deployment) or 'partition-id' (simulation)")
    try:
        index = int(node_config[key])
    except (TypeError, ValueError):
        raise ConfigError(f"node-config {key}={node_config[key]!r} is not an integer") from None
    n = num_sites(cfg)
    if not 0 <= index < n:
        raise ConfigError(f"node-config {key}={index} but the config has {n} sites (0..{n - 1})")
    if cfg.data.source == "builtin":
        from common.benchmark import benchmark_from_config

        bench = benchmark_from_config(cfg.data)
        site = bench.sites[index]
        spec = SiteSpec(index, site.site_id, site.position_km, site.classes,
                        bench.site_data(index), bench.video_dir(index) / "video.mp4")
    else:
        data_yaml = Path(node_config.get("data-path") or cfg.data.site_data[index]).expanduser()
        if not data_yaml.is_file():
            raise ConfigError(f"site {index}: dataset file not found: {data_yaml}")
        positions = cfg.data.site_positions_km
        pos = tuple(positions[index]) if index < len(positions) else (0.0, 0.0)
        sources = cfg.data.unlabelled
        unlabelled = Path(sources[index]).expanduser() if index < len(sources) and sources[index] else None
        spec = SiteSpec(index, f"site-{index}", pos, _label_classes(data_yaml), data_yaml, unlabelled)
    if node_config.get("unlabelled"):
        spec = replace(spec, unlabelled=Path(str(node_config["unlabelled"])).expanduser())
    if spec.unlabelled is not None and not spec.unlabelled.exists():
        raise ConfigError(f"site {index}: unlabelled frames not found: {spec.unlabelled}")
    if "position-km" in node_config:
        spec = replace(spec, position_km=_parse_position(node_config["position-km"], "position-km"))
    if "site-id" in node_config:
        spec = replace(spec, site_id=str(node_config["site-id"]))
    return spec
