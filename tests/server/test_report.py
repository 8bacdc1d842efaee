"""Tests for the run report (server.report) on a synthetic run folder; one integration test opens it in Chromium."""

import base64
import io
import json
import logging
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config import load_config, save_config
from common.routing import Detections
from server import report as R
from server.outputs import RunOutputs
from strategies.graph_kd import GraphKDStrategy

SITES = ("site-0", "site-1", "site-2")
MAP = {  # (site, round) -> (own-test mAP50, benchmark mAP50 or None when not evaluated)
    ("site-0", 1): (0.10, 0.55), ("site-1", 1): (0.05, 0.25), ("site-2", 1): (0.02, 0.15),
    ("site-0", 2): (0.30, None), ("site-1", 2): (0.20, None), ("site-2", 2): (0.125, 0.2),
    ("site-0", 3): (0.40, 0.6), ("site-1", 3): (0.35, 0.4), ("site-2", 3): (0.3333, 0.35),
}
COLLAB = {  # round 3 for site-0 and site-1, round 2 only for site-2
    ("site-0", 3): {"edge_map50": 0.40, "cloud_map50": 0.62, "collab_map50": 0.58, "edge_fnr": 0.5,
                    "collab_fnr": 0.25, "offload_fraction": 0.125, "offload_reasons": {"low-conf": 7, "small": 3},
                    "upload_bytes": 18234.5},
    ("site-1", 3): {"edge_map50": 0.35, "cloud_map50": 0.61, "collab_map50": 0.5, "edge_fnr": 0.4,
                    "collab_fnr": 0.3, "offload_fraction": 0.25, "offload_reasons": {"low-conf": 2},
                    "upload_bytes": 9000.0},
    ("site-2", 2): {"edge_map50": 0.1, "collab_map50": 0.2},
}


def _graph_record(server_round: int) -> dict:
    """The round's graph exactly as the strategy records it: site-0 and site-1 teach site-2."""
    strategy = GraphKDStrategy(num_classes=2, epochs_per_round=1, rho=0.34)
    strategy.profiles = {"site-0": {"position": [0.0, 0.0], "classes": [0, 1], "ap": [0.6, 0.5]},
                         "site-1": {"position": [2.0, 0.0], "classes": [0, 1], "ap": [0.2, 0.3]},
                         "site-2": {"position": [0.0, 2.0], "classes": [0, 1], "ap": [0.1, 0.2]}}
    strategy.edge_plan(server_round, list(SITES))
    return strategy.graph_record


def _frame(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(40, 90, size=(size, size, 3), dtype=np.uint8)  # dark noise: boxes stand out


GALLERY_ITEM = {"gt": {"xyxy": [[10, 10, 30, 30], [50, 50, 60, 62]], "cls": [0, 1]},
                "edge": Detections([[11, 9, 31, 29]], [0.8], [0]),
                "cloud": {"xyxy": [[10, 11, 29, 30], [49, 50, 61, 61]], "conf": [0.9, 0.6], "cls": [0, 1]},
                "merged": {"xyxy": [[10, 10, 30, 30], [49, 50, 61, 61]], "conf": [0.9, 0.6], "cls": [0, 1]}}


def _make_run(run_dir: Path) -> Path:
    """Three sites, three rounds, graph KD from round 2, a cloud round 3, collaboration metrics, a gallery."""
    run_dir.mkdir()
    save_config(load_config("quick", {"kd.mode": "graph", "kd.cloud-rounds": [3], "run-name": "quick-test"}),
                run_dir / "config.yaml")
    teachers = {  # (site, round) -> (proposed, kept), as GraphKDStrategy.on_reply records them
        ("site-2", 2): ({"site-0": 0.31, "site-1": 0.69}, {"site-1": 0.69}),  # the check rejects site-0
        ("site-0", 3): ({"cloud": 1.0}, {"cloud": 1.0}), ("site-1", 3): ({"cloud": 1.0}, {}),  # site-1: not the cloud
        ("site-2", 3): ({"cloud": 0.5, "site-0": 0.15, "site-1": 0.35}, {"cloud": 0.5, "site-0": 0.15}),
    }
    out = RunOutputs(run_dir)
    for (site, rnd), (test_map, bench) in MAP.items():
        proposed, kept = teachers.get((site, rnd), (None, None))
        out.append_metrics({"round": rnd, "site_id": site, "phase": "kd" if kept else "train",
                            "test_map50": test_map, "benchmark_map50": bench, "teachers_proposed": proposed,
                            "teachers": kept, "confident_recall": 0.5, **COLLAB.get((site, rnd), {})})
    (run_dir / "graphs").mkdir()
    for rnd in (2, 3):
        (run_dir / "graphs" / f"round-{rnd:03d}.json").write_text(json.dumps(_graph_record(rnd), indent=1))
    R.write_gallery(run_dir, "site-0", [{"image": _frame(k), **GALLERY_ITEM} for k in range(4)])
    return run_dir


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return _make_run(tmp_path / "quick-test")


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> str:
    """The synthetic run's report, built once for the tests that only read it."""
    return _page(_make_run(tmp_path_factory.mktemp("report") / "quick-test"))


class _Tables(HTMLParser):
    """``tables[id]`` = rows of cell texts (header row first); ``images`` = every img src."""

    def __init__(self, page: str):
        super().__init__()
        self.tables, self.images, self._id, self._cell = {}, [], None, None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._id = attrs.get("id")
            self.tables[self._id] = []
        elif tag == "tr" and self._id:
            self.tables[self._id].append([])
        elif tag in ("td", "th") and self._id:
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._id][-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            self._id = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _page(run_dir: Path) -> str:
    path = R.build_report(run_dir)
    assert path == run_dir / "report.html"
    return path.read_text()


# --- the page ------------------------------------------------------------------------------------------


def test_map_tables_equal_the_metrics(page):
    tables = _Tables(page).tables

    assert tables["table-test_map50"] == [
        ["site", "round 1", "round 2", "round 3"],
        ["site-0", "0.100", "0.300", "0.400"], ["site-1", "0.050", "0.200", "0.350"],
        ["site-2", "0.020", "0.125", "0.333"]]
    assert tables["table-benchmark_map50"][1:] == [  # not evaluated in round 2: "-"
        ["site-0", "0.550", "-", "0.600"], ["site-1", "0.250", "-", "0.400"], ["site-2", "0.150", "0.200", "0.350"]]


def test_overview_headline_is_the_last_round_mean(page):
    # own-test (0.4 + 0.35 + 0.3333) / 3 = 0.3611; benchmark (0.6 + 0.4 + 0.35) / 3 = 0.45
    assert "<dt>mean own-test mAP50, round 3</dt><dd>0.361</dd>" in page
    assert "<dt>mean benchmark mAP50, round 3</dt><dd>0.450</dd>" in page


def test_teachers_kept_and_rejected(page):
    tables = _Tables(page).tables

    assert tables["table-teachers"] == [
        ["round", "site", "role", "proposed teachers", "kept (taught)", "rejected by the student check"],
        ["2", "site-0", "teacher", "-", "-", "-"],
        ["2", "site-1", "teacher", "-", "-", "-"],
        ["2", "site-2", "student", "site-0, site-1", "site-1", "site-0"],
        ["3", "site-0", "teacher + student", "cloud", "cloud", "-"],
        ["3", "site-1", "teacher + student", "cloud", "-", "cloud"],
        ["3", "site-2", "student", "cloud, site-0, site-1", "cloud, site-0", "site-1"]]


def test_collaboration_table_latest_round_per_site(page):
    tables = _Tables(page).tables

    assert tables["table-collaboration"] == [
        ["site", "round", "edge_fnr", "edge_map50", "cloud_map50", "collab_fnr", "collab_map50", "offload_fraction",
         "offload_reasons", "upload_bytes"],
        ["site-0", "3", "0.500", "0.400", "0.620", "0.250", "0.580", "0.125", "low-conf: 7, small: 3", "18,234"],
        ["site-1", "3", "0.400", "0.350", "0.610", "0.300", "0.500", "0.250", "low-conf: 2", "9,000"],
        ["site-2", "2", "-", "0.100", "-", "-", "0.200", "-", "-", "-"]]


def test_collaboration_says_which_groups_were_not_measured(run_dir):
    rows = [{"round": 1, "site_id": "a", "edge_recall": 0.5, "offload_fraction": 0.2, "confident_recall": 0.1}]

    html = R._collaboration(R.Run(run_dir, rows=rows), R.Report())

    assert R.collaboration_columns(rows) == ["edge_recall", "offload_fraction"]
    assert "not measured in this run: cloud (cloud_*), merged (edge + cloud) (collab_*), upload bytes (upload_*)" \
        in html


def test_page_is_self_contained_with_every_figure(page):
    parsed = _Tables(page)

    # accuracy plot, 2 graphs, 1 gallery: all inline PNGs that decode
    assert len(parsed.images) == 4 and all(src.startswith("data:image/png;base64,") for src in parsed.images)
    sizes = [Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size for src in parsed.images]
    assert sizes == [(1100, 380), (500, 440), (500, 440), (1200, 440)]
    assert not re.search(r"(src|href)=\"(?!data:|#)|url\(|@import|<script|<link", page)
    for anchor in ("overview", "accuracy", "graphs", "teachers", "collaboration", "gallery"):
        assert f'<section id="{anchor}">' in page
    assert '<p class="absent">' not in page  # nothing missing in this run


def test_gallery_shows_three_keyframes_with_every_box_colour(page):
    parsed = _Tables(page)

    gallery = np.asarray(Image.open(io.BytesIO(base64.b64decode(parsed.images[-1].split(",", 1)[1]))).convert("RGB"))

    # 3 panels (of 4 keyframes) 4 inches wide; every box set's colour appears (the noise is grey, < 90)
    assert gallery.shape == (440, 1200, 3)
    for name, (colour, _, _) in R.BOX_STYLE.items():
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(gallery.astype(int) - rgb).sum(axis=2) < 30).sum() > 20, name


def test_rebuild_is_identical_and_the_cli_prints_the_path(run_dir, capsys):
    first = _page(run_dir)

    rc = R.main([str(run_dir), "--wandb", "off"])

    assert rc == 0 and capsys.readouterr().out.strip() == str(run_dir / "report.html")
    assert (run_dir / "report.html").read_text() == first


def test_cli_unknown_folder_returns_2(tmp_path, capsys):
    assert R.main([str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


# --- parts missing --------------------------------------------------------------------------------------


def test_run_with_only_metrics_says_what_is_absent(run_dir):
    shutil.rmtree(run_dir / "graphs")
    shutil.rmtree(run_dir / "gallery")
    (run_dir / "config.yaml").unlink()
    rows = [{k: v for k, v in r.items() if not k.startswith(("teachers", *R.COLLAB_GROUPS))}
            for r in RunOutputs(run_dir).read_metrics()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    page = _page(run_dir)

    assert "absent from this run folder: config.yaml, graphs/, gallery/" in page
    assert "no graphs/: this run built no collaboration graph" in page
    assert "no distillation in this run" in page
    assert "collaboration with the cloud service: not measured in this run" in page
    assert "no gallery/" in page
    assert len(_Tables(page).images) == 1  # the accuracy plot


def test_empty_run_folder_renders(tmp_path):
    page = _page(tmp_path)

    assert "no metrics.jsonl: no site reported a round" in page
    assert "absent from this run folder: config.yaml, metrics.jsonl, graphs/, gallery/" in page


def test_missing_run_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        R.build_report(tmp_path / "nope")


def test_a_broken_gallery_is_reported_in_the_page(run_dir):
    (run_dir / "gallery" / "site-1.json").write_text(json.dumps([{"image": "gallery/site-1/0.png", "gt": None}]))

    page = _page(run_dir)

    assert "cannot show this gallery: " in page and "image &#x27;gallery/site-1/0.png&#x27; is not a file" in page
    assert len(_Tables(page).images) == 4  # site-0's gallery still there


# --- gallery format ---------------------------------------------------------------------------------------


def test_write_gallery_format(tmp_path):
    src = tmp_path / "frame.jpg"
    Image.fromarray(_frame(1)).save(src)

    path = R.write_gallery(tmp_path, "site-7", [{"image": _frame(0), **GALLERY_ITEM, "cloud": None},
                                                {"image": src, "gt": Detections()}])

    assert path == tmp_path / "gallery" / "site-7.json"
    items = json.loads(path.read_text())
    assert [i["image"] for i in items] == ["gallery/site-7/0.png", "gallery/site-7/1.jpg"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / items[0]["image"])), _frame(0))
    assert items[0]["gt"] == {"xyxy": [[10.0, 10.0, 30.0, 30.0], [50.0, 50.0, 60.0, 62.0]], "conf": [1.0, 1.0],
                              "cls": [0, 1]}
    assert items[0]["edge"] == {"xyxy": [[11.0, 9.0, 31.0, 29.0]], "conf": [0.8], "cls": [0]}
    assert items[0]["cloud"] is None and items[1]["edge"] is None
    assert items[1]["gt"] == {"xyxy": [], "conf": [], "cls": []}
    assert R.read_gallery(tmp_path, "site-7") == items


@pytest.mark.parametrize("item, named", [
    ({"image": np.zeros((4, 4), np.uint8)}, "uint8 (4, 4)"),
    ({"image": "missing.png"}, "'missing.png' is not a file"),
    ({"image": np.zeros((4, 4, 3), np.uint8), "edge": {"xyxy": [[0, 0, 1, 1]], "conf": [0.5, 0.4]}},
     "item 0 edge: xyxy, conf and cls must have the same length, got 1, 2, 1"),
    ({"image": np.zeros((4, 4, 3), np.uint8), "gt": {"xyxy": [[0, 0, 1]]}},
     "item 0 gt: xyxy must have shape (N, 4), got (1, 3)"),
])
def test_write_gallery_bad_input_is_named(tmp_path, item, named):
    with pytest.raises(R.GalleryError, match=re.escape(named)):
        R.write_gallery(tmp_path, "site-0", [item])


# --- end of a run ------------------------------------------------------------------------------------------


class _FakeTracker:
    def __init__(self):
        self.logged = []

    def report(self, images, tables):
        self.logged.append((images, tables))


def test_finish_logs_summary_and_path_and_feeds_the_tracker(run_dir, caplog):
    caplog.set_level(logging.INFO, logger="server.outputs")
    tracker = _FakeTracker()

    path = RunOutputs(run_dir).finish(tracker)

    assert path == run_dir / "report.html" and path.is_file()
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith(f"summary ({run_dir / 'summary.md'}):\n# Run summary: quick-test")
    assert "| site-2 | 0.020 | 0.125 | 0.333 |" in messages[0]
    assert messages[1] == f"report: {path.resolve()} (rebuild: python -m server.report {run_dir})"
    (images, tables), = tracker.logged
    assert sorted(images) == ["accuracy", "gallery/site-0", "graph/round-002", "graph/round-003"]
    assert all(v.startswith(b"\x89PNG") for v in images.values())
    assert tables["collaboration"][1][0][8] == "low-conf: 7, small: 3"  # W&B tables take no dicts
    assert tables["collaboration"][1][2] == ["site-2", 2, None, 0.1, None, None, 0.2, None, None, None]
    assert tables["test_map50"][1][0] == ["site-0", 0.1, 0.3, 0.4]
    wandb = pytest.importorskip("wandb")
    for key, (columns, rows) in tables.items():  # W&B accepts every table (its cells type-check per column)
        assert wandb.Table(columns=columns, data=rows).data == rows, key


def test_finish_logs_a_report_failure_instead_of_raising(run_dir, caplog, monkeypatch):
    def broken(run):
        raise RuntimeError("disk full")

    monkeypatch.setattr(R, "render", broken)

    assert RunOutputs(run_dir).finish() is None
    assert "report: cannot build it; rebuild with: python -m server.report" in caplog.text
    assert "disk full" in caplog.text


# --- in a browser --------------------------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.mark.integration
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e .[test])")
    page_path = R.build_report(run_dir)
    errors, requests = [], []

    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, chromium_sandbox=False,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri(), wait_until="load")
            natural = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
            headings = page.eval_on_selector_all("section h2", "hs => hs.map(h => h.textContent)")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            context.close()

    assert errors == []
    assert [u for u in requests if not u.startswith("data:")] == [page_path.as_uri()]  # nothing else loaded
    assert natural == [[True, 1100], [True, 500], [True, 500], [True, 1200]]
    assert headings == ["Overview", "mAP50 per round", "Collaboration graph per round", "Who taught whom",
                        "Edge-cloud collaboration", "Keyframes: ground truth, edge, cloud and merged boxes"]
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[1] == 1280 and image.shape[0] > 2000  # the full page, taller than the viewport
    assert image.std() > 20  # not blank
