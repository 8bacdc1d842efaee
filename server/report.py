"""The run report: ``<run>/report.html``, one self-contained page built from the run folder alone.

::

    python -m server.report outputs/<run> [--wandb off|offline|online]

The page has inline CSS and PNG images inlined as base64; it loads nothing from anywhere.
It reads, from the run folder (every part is optional; the page says what is absent):

::

    config.yaml             the resolved configuration (title, KD settings, cloud rounds)
    metrics.jsonl           one row per site per round (server.outputs.RunOutputs); ``teachers_proposed``
                            and ``teachers`` (kept by the student check) say who taught whom
    graphs/round-NNN.json   the round's graph (GraphKDStrategy.graph_record)
    gallery/<site>.json     keyframes with boxes, written by :func:`write_gallery`

and shows: own-test and benchmark mAP50 per site per round (a line plot and a table); the graph
of every round; who taught whom, with the proposed teachers the student check kept or rejected;
the collaboration table (every metrics column named ``edge_*``, ``cloud_*``, ``collab_*``,
``offload_*``, ``upload_*``, the latest round that measured it per site); a gallery of three
keyframes per site.

Gallery format, ``gallery/<site>.json``: a JSON list of keyframes, each

::

    {"image": "gallery/<site>/<k>.png",          # relative to the run folder
     "gt": BOXES, "edge": BOXES, "cloud": BOXES, "merged": BOXES}
    BOXES = {"xyxy": [[x1, y1, x2, y2], ...],    # pixels of that image
             "conf": [c, ...], "cls": [k, ...]}  # same length as xyxy; conf may be omitted for "gt"

A box set that is missing or ``null`` was not measured (e.g. no cloud answer for that frame).
Producers call :func:`write_gallery`, which writes the images and this file.

The same figures and tables go to W&B (:meth:`server.tracking.Tracker.report`). At the end of
a run the ServerApp calls :meth:`server.outputs.RunOutputs.finish`: the summary table and the
report's path on the console.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from common.protocol import GALLERY_FRAMES
from server.outputs import RunOutputs, per_site_round

log = logging.getLogger(__name__)

BOX_SETS = ("gt", "edge", "cloud", "merged")
BOX_STYLE = {  # colour, line style, line width: distinct at a glance, also in grey scale
    "gt": ("#2ca02c", "-", 2.0), "edge": ("#1f77b4", "--", 1.2),
    "cloud": ("#ff7f0e", ":", 1.6), "merged": ("#d62728", "-", 1.0),
}
BOX_LABEL = {"gt": "ground truth", "edge": "edge", "cloud": "cloud", "merged": "merged (edge + cloud)"}
COLLAB_GROUPS = {"edge_": "edge", "cloud_": "cloud", "collab_": "merged (edge + cloud)", "offload_": "offloading",
                 "upload_": "upload bytes"}
MAP_KEYS = {"test_map50": "own-test mAP50", "benchmark_map50": "benchmark mAP50"}


class GalleryError(ValueError):
    """A gallery file or image is malformed or missing; the message names the file and the bad value."""


# --- gallery: the producer side -----------------------------------------------------------------


def write_gallery(run_dir: Path, site: str, items: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``gallery/<site>.json`` and its images (format: module docstring).

    Parameters
    ----------
    run_dir : Path
        The run folder.
    site : str
        Site id (the file name).
    items : sequence of mappings
        ``{"image": <path to an image file, or an (H, W, 3) uint8 RGB array>, "gt": boxes,
        "edge": boxes, "cloud": boxes, "merged": boxes}``; ``boxes`` is a mapping or an object
        (e.g. ``common.routing.Detections``) with ``xyxy``, ``conf``, ``cls``, or None.
    """
    import numpy as np
    from PIL import Image

    run_dir = Path(run_dir)
    image_dir = run_dir / "gallery" / site
    image_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for k, item in enumerate(items):
        image = item.get("image")
        if isinstance(image, (str, Path)):
            if not Path(image).is_file():
                raise GalleryError(f"gallery {site} item {k}: image {str(image)!r} is not a file")
            dest = image_dir / f"{k}{Path(image).suffix.lower() or '.png'}"
            shutil.copyfile(image, dest)
        else:
            array = np.asarray(image)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
                raise GalleryError(f"gallery {site} item {k}: image must be an (H, W, 3) uint8 RGB array or a "
                                   f"file, got {array.dtype} {array.shape}")
            dest = image_dir / f"{k}.png"
            Image.fromarray(array).save(dest)
        entry = {"image": dest.relative_to(run_dir).as_posix()}
        for name in BOX_SETS:
            entry[name] = None if item.get(name) is None else _box_set(item[name], f"gallery {site} item {k} {name}")
        out.append(entry)
    path = run_dir / "gallery" / f"{site}.json"
    path.write_text(json.dumps(out, indent=1))
    return path


def _box_set(boxes: Any, where: str) -> dict[str, list]:
    """``{"xyxy", "conf", "cls"}`` as plain lists from a mapping or an object with those attributes
    (checked by ``common.routing.Detections``); ``conf`` and ``cls`` default to 1 and 0 (ground truth)."""
    from common.routing import Detections

    get = boxes.get if isinstance(boxes, Mapping) else (lambda key: getattr(boxes, key, None))
    xyxy = [] if get("xyxy") is None else get("xyxy")
    n = len(xyxy)
    try:
        d = Detections(xyxy, [1.0] * n if get("conf") is None else get("conf"), [0] * n if get("cls") is None
                       else get("cls"))
    except ValueError as err:
        raise GalleryError(f"{where}: {err}") from None
    return {"xyxy": d.xyxy.tolist(), "conf": d.conf.tolist(), "cls": d.cls.tolist()}


def read_gallery(run_dir: Path, site: str) -> list[dict[str, Any]]:
    """The keyframes of ``gallery/<site>.json``, checked; :class:`GalleryError` names what is wrong."""
    path = Path(run_dir) / "gallery" / f"{site}.json"
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise GalleryError(f"{path}: not JSON ({err})") from None
    if not isinstance(items, list):
        raise GalleryError(f"{path}: expected a list of keyframes, got {type(items).__name__}")
    for k, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise GalleryError(f"{path}: item {k} needs an 'image' (a path relative to the run folder)")
        if not (Path(run_dir) / item["image"]).is_file():
            raise GalleryError(f"{path}: item {k}: image {item['image']!r} is not a file")
        for name in BOX_SETS:
            if item.get(name) is not None:
                if not isinstance(item[name], dict):
                    raise GalleryError(f"{path}: item {k} {name}: expected {{'xyxy', 'conf', 'cls'}}")
                item[name] = _box_set(item[name], f"{path}: item {k} {name}")
    return items


# --- reading the run folder ---------------------------------------------------------------------


@dataclass
class Run:
    run_dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    graphs: dict[int, dict[str, Any]] = field(default_factory=dict)  # round -> graph record
    galleries: dict[str, list[dict[str, Any]] | str] = field(default_factory=dict)  # site -> items or error

    @property
    def cloud_rounds(self) -> set[int]:
        return {int(r) for r in (self.config.get("kd") or {}).get("cloud_rounds") or []}


def read_config(run_dir: Path) -> dict[str, Any]:
    """``config.yaml`` as a plain dict (``{}`` when absent): the report reads only a few keys."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def load_run(run_dir: Path) -> Run:
    """Everything the report shows, read from the run folder; absent parts stay empty."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
    run = Run(run_dir, config=read_config(run_dir))
    run.rows = RunOutputs(run_dir).read_metrics()
    for path in sorted((run_dir / "graphs").glob("round-*.json")):
        record = json.loads(path.read_text())
        run.graphs[int(record.get("round", path.stem.split("-")[-1]))] = record
    for path in sorted((run_dir / "gallery").glob("*.json")):
        try:
            run.galleries[path.stem] = read_gallery(run_dir, path.stem)
        except GalleryError as err:
            log.warning("report: %s", err)
            run.galleries[path.stem] = str(err)
    return run


# --- tables ---------------------------------------------------------------------------------------


def teacher_table(run: Run) -> list[dict[str, Any]]:
    """Per round and site: role, the teachers proposed to it, those its student check kept and rejected.

    From each metrics row's ``teachers_proposed`` and ``teachers`` (kept), and the round graph's
    ``teachers``; rows of sites that neither taught nor were taught are left out.
    """
    out = []
    for row in sorted(run.rows, key=lambda r: (r["round"], r["site_id"])):
        site, proposed, kept = row["site_id"], set(row.get("teachers_proposed") or ()), set(row.get("teachers") or ())
        role = [name for name, yes in [("teacher", site in (run.graphs.get(row["round"], {}).get("teachers") or [])),
                                       ("student", proposed)] if yes]
        if role:
            out.append({"round": row["round"], "site": site, "role": " + ".join(role), "proposed": sorted(proposed),
                        "kept": sorted(kept), "rejected": sorted(proposed - kept)})
    return out


def collaboration_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Metrics columns of the collaboration table, grouped by prefix (``COLLAB_GROUPS`` order), then by name."""
    keys = {k for r in rows for k, v in r.items() if v is not None and k.startswith(tuple(COLLAB_GROUPS))}
    return sorted(keys, key=lambda k: ([k.startswith(p) for p in COLLAB_GROUPS].index(True), k))


def collaboration_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """``(columns, [row])``: per site, the latest round that measured any collaboration column."""
    columns = collaboration_columns(rows)
    latest: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["round"]):
        if any(row.get(c) is not None for c in columns):
            latest[row["site_id"]] = row
    return columns, [latest[s] for s in sorted(latest)]


def cell(value: Any) -> str:
    """A table cell: ``-`` for absent, 3 decimals below 100, thousands separators above, ``k: v`` for dicts.

    >>> [cell(None), cell(0.45678), cell(12345.6), cell(7), cell({"b": 2, "a": 1}), cell(float("nan"))]
    ['-', '0.457', '12,346', '7', 'a: 1, b: 2', '-']
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3f}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {cell(v)}" for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value)
    return str(value)


def _scalar(value: Any) -> Any:
    """A number, string or None as it is; anything else (offload reasons: a dict) as its table cell."""
    return value if value is None or isinstance(value, (int, float, str)) else cell(value)


# --- figures ----------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> bytes:
    """The figure as PNG bytes; closes it."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def accuracy_figure(rows: list[dict[str, Any]]):
    """Own-test and benchmark mAP50 per round, one line per site and the mean (dashed)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(MAP_KEYS), figsize=(11, 3.8), sharey=True)
    for ax, (key, title) in zip(axes, MAP_KEYS.items()):
        sites, rounds, values = per_site_round(rows, key)
        for site in sites:
            pts = sorted(values[site].items())
            ax.plot([r for r, _ in pts], [v for _, v in pts], marker="o", label=site)
        reported = {r: {row["site_id"] for row in rows if row["round"] == r} for r in rounds}
        means = [(r, sum(values[s][r] for s in reported[r]) / len(reported[r])) for r in rounds
                 if all(r in values[s] for s in reported[r])]  # a mean over a subset of the sites misleads
        if means:
            ax.plot([r for r, _ in means], [m for _, m in means], "k--", lw=1.5, label="mean")
        else:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mAP50")
    axes[0].set_ylim(bottom=0)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    return fig


def gallery_figure(run_dir: Path, site: str, items: list[dict[str, Any]]):
    """Up to ``GALLERY_FRAMES`` keyframes side by side, every box set in its own colour, one legend."""
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle
    from PIL import Image

    plt = _pyplot()
    items = items[:GALLERY_FRAMES]
    fig, axes = plt.subplots(1, len(items), figsize=(4 * len(items), 4.4), squeeze=False)
    for ax, item in zip(axes[0], items):
        ax.imshow(np.asarray(Image.open(Path(run_dir) / item["image"]).convert("RGB")))
        counts = []
        for name in BOX_SETS:
            boxes = item.get(name)
            if boxes is None:
                continue
            colour, style, width = BOX_STYLE[name]
            for x1, y1, x2, y2 in boxes["xyxy"]:
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=colour, ls=style, lw=width))
            counts.append(f"{name} {len(boxes['xyxy'])}")
        ax.set_title(Path(item["image"]).name + ": " + ", ".join(counts), fontsize=8)
        ax.axis("off")
    present = [n for n in BOX_SETS if any(item.get(n) is not None for item in items)]
    fig.legend([Line2D([], [], color=BOX_STYLE[n][0], ls=BOX_STYLE[n][1], lw=2) for n in BOX_SETS],
               [BOX_LABEL[n] + ("" if n in present else " (absent)") for n in BOX_SETS],
               loc="lower center", ncol=len(BOX_SETS), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    return fig


# --- the page ---------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;background:#f4f5f7;
color:#1d2330;line-height:1.45}
header{background:#1d2330;color:#fff;padding:18px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c7cbd4;font-size:14px}
nav{background:#fff;border-bottom:1px solid #dde0e6;padding:8px 32px;position:sticky;top:0}
nav a{margin-right:18px;color:#1f5fbf;text-decoration:none;font-size:14px}
main{max-width:1200px;margin:0 auto;padding:8px 24px 40px}
section{background:#fff;border:1px solid #dde0e6;border-radius:8px;margin:18px 0;padding:14px 22px}
h2{font-size:18px;margin:4px 0 10px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 12px}
th,td{border-bottom:1px solid #e6e8ec;padding:4px 10px;text-align:right}th.text{text-align:left}
th{background:#f0f2f5;font-weight:600}td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fafbfc}td.text{text-align:left}
img{max-width:100%;height:auto}.grid{display:flex;flex-wrap:wrap;gap:12px}
.grid figure{margin:0;flex:0 1 520px}figcaption{font-size:12px;color:#5b6270}
.absent{color:#8a5a00;background:#fff6e0;border-left:4px solid #f0b400;padding:6px 10px;font-size:14px}
.kept{color:#1a7f37;font-weight:600}.rejected{color:#b3261e;text-decoration:line-through}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:14px;margin:0}dt{color:#5b6270}
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _absent(text: str) -> str:
    return f'<p class="absent">{_e(text)}</p>'


def _table(table_id: str, header: list[str], body: list[list[str]], text_cols: int = 1) -> str:
    head = "".join(f'<th class="text">{_e(h)}</th>' if i < text_cols else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(header))
    rows = "".join("<tr>" + "".join(f'<td class="text">{c}</td>' if i < text_cols else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in body)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


@dataclass
class Report:
    """The page's parts: HTML sections, and the same figures/tables for W&B."""

    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (anchor, title, html)
    images: dict[str, bytes] = field(default_factory=dict)
    tables: dict[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict)


def _overview(run: Run) -> str:
    cfg, kd = run.config, run.config.get("kd") or {}
    sites = sorted({r["site_id"] for r in run.rows})
    rounds = sorted({r["round"] for r in run.rows})
    facts = [("run folder", str(run.run_dir.resolve())), ("preset", cfg.get("preset", "-")),
             ("sites", f"{len(sites)}: {', '.join(sites)}" if sites else "none reported"),
             ("rounds reported", f"{rounds[0]}-{rounds[-1]}" if rounds else "none"),
             *((f"mean {title}, round {rounds[-1]}", cell(_last_round_mean(run.rows, key)))
               for key, title in MAP_KEYS.items() if rounds),
             ("edge / cloud model", f"{(cfg.get('model') or {}).get('edge', '-')} / "
                                    f"{(cfg.get('model') or {}).get('cloud', '-')}"),
             ("KD", f"mode {kd.get('mode', '-')}, rho {kd.get('rho', '-')}, student check "
                    f"{kd.get('student_check', '-')}, cloud rounds {sorted(run.cloud_rounds) or 'none'}")]
    absent = [what for what, there in [("config.yaml", run.config), ("metrics.jsonl", run.rows),
                                       ("graphs/", run.graphs), ("gallery/", run.galleries)] if not there]
    body = "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts) + "</dl>"
    return body + (_absent("absent from this run folder: " + ", ".join(absent)) if absent else "")


def _last_round_mean(rows: list[dict[str, Any]], key: str) -> float | None:
    """Mean of ``key`` over the sites that reported the last round; None unless every one measured it."""
    sites, rounds, values = per_site_round(rows, key)
    last = [values[r["site_id"]].get(rounds[-1]) for r in rows if r["round"] == rounds[-1]]
    return None if None in last else sum(last) / len(last)


def _accuracy(run: Run, report: Report) -> str:
    if not run.rows:
        return _absent("no metrics.jsonl: no site reported a round")
    report.images["accuracy"] = png(accuracy_figure(run.rows))
    parts = [_img(report.images["accuracy"], "mAP50 per round")]
    for key, title in MAP_KEYS.items():
        sites, rounds, values = per_site_round(run.rows, key)
        body = [[_e(s)] + [cell(values[s].get(r)) for r in rounds] for s in sites]
        parts += [f"<h3>{_e(title)}</h3>", _table(f"table-{key}", ["site"] + [f"round {r}" for r in rounds], body)]
        report.tables[key] = (["site"] + [f"round {r}" for r in rounds],
                              [[s] + [values[s].get(r) for r in rounds] for s in sites])
    return "".join(parts)


def _graphs(run: Run, report: Report) -> str:
    if not run.graphs:
        return _absent("no graphs/: this run built no collaboration graph (kd.mode=none, or no KD round yet)")
    from server.graph_plot import graph_figure

    figures = []
    for rnd, record in sorted(run.graphs.items()):
        if "nodes" in record:
            data = report.images[f"graph/round-{rnd:03d}"] = png(graph_figure(record))
            caption = f"round {rnd}: teachers {', '.join(map(str, record.get('teachers', []))) or 'none'}"
            figures.append(f"<figure>{_img(data, f'graph round {rnd}')}<figcaption>{_e(caption)}</figcaption>"
                           "</figure>")
        else:
            figures.append(f"<figure><figcaption>round {rnd}: mode {_e(record.get('mode', '?'))}: every other site "
                           "teaches, uniformly (no graph)</figcaption></figure>")
    return ('<p>Arc i &rarr; j: site i leans on site j; width ~ normalised weight. Orange: teachers and the arcs '
            'their students learn over.</p><div class="grid">' + "".join(figures) + "</div>")


def _teachers(run: Run, report: Report) -> str:
    table = teacher_table(run)
    if not table:
        return _absent("no distillation in this run: no round proposed teachers")

    def names(ts, css):
        return ", ".join(f'<span class="{css}">{_e(t)}</span>' for t in ts) or "-"

    body = [[str(t["round"]), _e(t["site"]), t["role"], names(t["proposed"], ""),
             names(t["kept"], "kept"), names(t["rejected"], "rejected")]
            for t in table]
    header = ["round", "site", "role", "proposed teachers", "kept (taught)", "rejected by the student check"]
    report.tables["teachers"] = (header, [[t["round"], t["site"], t["role"], ", ".join(t["proposed"]),
                                           ", ".join(t["kept"]), ", ".join(t["rejected"])] for t in table])
    return ("<p>Proposed: the graph's choice for the student (and the cloud on a cloud round). The student check "
            "keeps a teacher only if it beats the student on the student's own validation split.</p>"
            + _table("table-teachers", header, body, text_cols=6))


def _collaboration(run: Run, report: Report) -> str:
    columns, rows = collaboration_table(run.rows)
    missing = [f"{label} ({prefix}*)" for prefix, label in COLLAB_GROUPS.items()
               if not any(c.startswith(prefix) for c in columns)]
    if not columns:
        return _absent("collaboration with the cloud service: not measured in this run")
    header = ["site", "round", *columns]
    report.tables["collaboration"] = (header, [[r["site_id"], r["round"], *(_scalar(r.get(c)) for c in columns)]
                                               for r in rows])
    body = [[_e(r["site_id"]), str(r["round"]), *(_e(cell(r.get(c))) for c in columns)] for r in rows]
    note = _absent("not measured in this run: " + ", ".join(missing)) if missing else ""
    return ("<p>Each site's latest measured round: its edge model alone, the cloud model, and the merged answer "
            "(FNR: missed ground-truth boxes / all; bytes: uploaded per image).</p>"
            + _table("table-collaboration", header, body) + note)


def _gallery(run: Run, report: Report) -> str:
    if not run.galleries:
        return _absent("no gallery/: no site saved keyframes with boxes in this run")
    parts = []
    for site, items in sorted(run.galleries.items()):
        if isinstance(items, str):
            parts.append(f"<h3>{_e(site)}</h3>" + _absent(f"cannot show this gallery: {items}"))
        elif not items:
            parts.append(f"<h3>{_e(site)}</h3>" + _absent("no keyframes"))
        else:
            data = report.images[f"gallery/{site}"] = png(gallery_figure(run.run_dir, site, items))
            parts.append(f"<h3>{_e(site)}</h3>{_img(data, f'gallery {site}')}")
    return "".join(parts)


def render(run: Run) -> tuple[str, Report]:
    """The page's HTML and its parts."""
    report = Report()
    for anchor, title, part in [("overview", "Overview", lambda r, _: _overview(r)),
                                ("accuracy", "mAP50 per round", _accuracy),
                                ("graphs", "Collaboration graph per round", _graphs),
                                ("teachers", "Who taught whom", _teachers),
                                ("collaboration", "Edge-cloud collaboration", _collaboration),
                                ("gallery", "Keyframes: ground truth, edge, cloud and merged boxes", _gallery)]:
        report.sections.append((anchor, title, part(run, report)))
    name = _e(run.run_dir.name)
    nav = "".join(f'<a href="#{a}">{_e(t.split(":")[0])}</a>' for a, t, _ in report.sections)
    body = "".join(f'<section id="{a}"><h2>{_e(t)}</h2>{h}</section>' for a, t, h in report.sections)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>cedar run {name}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f"<body><header><h1>cedar run {name}</h1><p>federated small-object detection: graph-guided "
            f"distillation and edge-cloud collaboration</p></header><nav>{nav}</nav><main>{body}</main>"
            "</body></html>\n")
    return page, report


def build_report(run_dir: Path, tracker=None) -> Path:
    """(Re)build ``<run_dir>/report.html`` from the run folder; log its figures and tables to ``tracker``."""
    run = load_run(Path(run_dir))
    page, report = render(run)
    path = run.run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    if tracker is not None:
        tracker.report(report.images, report.tables)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="the run folder, e.g. outputs/quick-20260101-120000")
    parser.add_argument("--wandb", choices=("off", "offline", "online"), default=None,
                        help="also log the figures to W&B (default: the run's tracking.wandb)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not args.run_dir.is_dir():
        print(f"server.report: run folder {str(args.run_dir)!r} does not exist", file=sys.stderr)
        return 2
    config = read_config(args.run_dir)
    tracking = config.get("tracking") or {}
    mode = args.wandb or tracking.get("wandb", "offline")
    tracker = None
    if mode != "off":
        from server.tracking import Tracker

        tracker = Tracker(mode, tracking.get("project", "cedar"), args.run_dir, config,
                          f"{args.run_dir.name}-report")
    try:
        path = build_report(args.run_dir, tracker)
    finally:
        if tracker is not None:
            tracker.finish()
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
