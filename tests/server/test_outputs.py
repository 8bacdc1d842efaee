"""Tests for the server's run folder (server.outputs), tracking (server.tracking) and CLI (server.simulate)."""

import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from common.config import from_run_config, load_config
from server import simulate
from server.outputs import RunOutputs, make_run_dir
from server.simulate import build_command
from server.tracking import Tracker
from tests import REPO

NAN = float("nan")


# --- RunOutputs -----------------------------------------------------------------------------


def test_create_writes_the_resolved_config(tmp_path):
    cfg = load_config("quick", {"output-dir": str(tmp_path), "run-name": "r1", "federation.num-rounds": 4})

    out = RunOutputs.create(cfg)

    assert out.run_dir == tmp_path / "r1"
    saved = load_config("saved", conf_dir=_as_conf_dir(out.run_dir / "config.yaml", tmp_path / "conf"))
    assert saved.federation.num_rounds == 4 and saved.run_name == "r1" and saved.data.imgsz == 256
    assert out.node_weights_path("site-2") == tmp_path / "r1" / "nodes" / "site-2" / "model.pt"


def _as_conf_dir(config_yaml: Path, conf_dir: Path) -> Path:
    conf_dir.mkdir()
    (conf_dir / "base.yaml").write_text("{}\n")
    (conf_dir / "saved.yaml").write_text(config_yaml.read_text())
    return conf_dir


def test_default_run_name_is_preset_and_timestamp(tmp_path):
    cfg = load_config("standard", {"output-dir": str(tmp_path)})

    run_dir = make_run_dir(cfg)

    assert run_dir.parent == tmp_path and run_dir.is_dir()
    prefix, date, clock = run_dir.name.split("-")
    assert prefix == "standard" and len(date) == 8 and len(clock) == 6 and (date + clock).isdigit()


def test_metrics_jsonl_nan_becomes_null(tmp_path):
    out = RunOutputs(tmp_path)

    out.append_metrics({"round": 1, "site_id": "site-0", "test_map50": NAN, "ap": [0.5, NAN], "n": 3})
    out.append_metrics({"round": 2, "site_id": "site-0", "nested": {"x": NAN, "y": (1.0, NAN)}})

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == '{"round": 1, "site_id": "site-0", "test_map50": null, "ap": [0.5, null], "n": 3}'
    assert json.loads(lines[1]) == {"round": 2, "site_id": "site-0", "nested": {"x": None, "y": [1.0, None]}}
    assert out.read_metrics()[0]["ap"] == [0.5, None]


def test_read_metrics_without_file(tmp_path):
    assert RunOutputs(tmp_path).read_metrics() == []


def test_summary_table_hand_checked(tmp_path):
    # Prepare: site-b has no value in round 1 (NaN -> null) and no row in round 2
    out = RunOutputs(tmp_path / "run-x")
    out.run_dir.mkdir()
    for rec in [
        {"round": 1, "site_id": "site-a", "test_map50": 0.5, "benchmark_map50": 0.25},
        {"round": 2, "site_id": "site-a", "test_map50": 0.6666, "benchmark_map50": 0.1235},
        {"round": 1, "site_id": "site-b", "test_map50": NAN, "benchmark_map50": 1},
    ]:
        out.append_metrics(rec)

    # Execute
    path = out.write_summary()

    # Assert
    assert path == tmp_path / "run-x" / "summary.md"
    assert path.read_text() == (
        "# Run summary: run-x\n"
        "\n"
        "## test_map50\n"
        "\n"
        "| site | round 1 | round 2 |\n"
        "|---|---|---|\n"
        "| site-a | 0.500 | 0.667 |\n"
        "| site-b | - | - |\n"
        "\n"
        "## benchmark_map50\n"
        "\n"
        "| site | round 1 | round 2 |\n"
        "|---|---|---|\n"
        "| site-a | 0.250 | 0.123 |\n"
        "| site-b | 1.000 | - |\n"
    )


def test_summary_of_an_empty_run(tmp_path):
    out = RunOutputs(tmp_path)

    text = out.write_summary(keys=("test_map50",)).read_text()

    assert text == f"# Run summary: {tmp_path.name}\n\n## test_map50\n\n| site |  |\n|---|\n"


# --- Tracker --------------------------------------------------------------------------------

_PROBE = """
import os, sys
from pathlib import Path
from server.tracking import Tracker
t = Tracker(sys.argv[1], "cedar", Path(sys.argv[2]), {"a": 1}, "probe")
t.log({"x": 1.0}, step=1)
t.table("t", ["a"], [[1]], step=1)
t.finish()
print("wandb" in sys.modules, t.run is None)
"""


def _probe(mode: str, tmp_path: Path, wandb_mode: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    if wandb_mode is not None:
        env["WANDB_MODE"] = wandb_mode
    done = subprocess.run([sys.executable, "-c", _PROBE, mode, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_tracker_off_never_imports_wandb(tmp_path):
    assert _probe("off", tmp_path, wandb_mode=None) == "False True"


def test_tracker_disabled_by_environment_never_imports_wandb(tmp_path):
    assert _probe("offline", tmp_path, wandb_mode="disabled") == "False True"
    assert list(tmp_path.iterdir()) == []  # no wandb/ folder either


def test_tracker_off_in_process_is_a_no_op(tmp_path):
    t = Tracker("online", "cedar", tmp_path, {}, "x")  # WANDB_MODE=disabled (conftest) wins

    t.log({"x": 1}, step=1)
    t.finish()

    assert t.run is None


def test_tracker_report_logs_images_and_tables_under_report(tmp_path):
    # Prepare: a tracker whose W&B run is a recorder (no wandb.init); a 3x2 red PNG
    wandb = pytest.importorskip("wandb")
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (3, 2), (255, 0, 0)).save(buf, format="PNG")
    logged = []
    t = Tracker("off", "cedar", tmp_path, {}, "x")
    t.run = type("Run", (), {"log": lambda self, data: logged.append(data)})()

    # Execute
    t.report({"accuracy": buf.getvalue()}, {"teachers": (["round", "site"], [[2, "site-1"]])})

    # Assert
    (data,) = logged
    assert sorted(data) == ["report/accuracy", "report/teachers"]
    assert isinstance(data["report/accuracy"], wandb.Image) and data["report/accuracy"].image.size == (3, 2)
    assert data["report/teachers"].columns == ["round", "site"] and data["report/teachers"].data == [[2, "site-1"]]


# --- cedar-simulate -------------------------------------------------------------------------


def test_build_command_exact_argv():
    cmd = build_command("quick", ["federation.num-rounds=5", "train.batch=4"], 4, app_dir=Path("/app"))

    assert cmd == ["flwr", "run", "/app", "--stream", "--run-config",
                   'preset="quick" overrides="federation.num-rounds=5 train.batch=4"',
                   "--federation-config", "num-supernodes=4 client-resources-num-cpus=2 client-resources-num-gpus=0.0"]


def test_build_command_without_overrides_with_resources_that_flower_parses():
    """What ``flwr run`` makes of the federation config: Flower's own parser and its SimulationConfig message."""
    from flwr.supercore.utils import simulation_config_from_json

    cmd = build_command("paper", [], 6, app_dir=Path("/app"), client_cpus=4, client_gpus=0.5, sim_cpus=16)

    federation = "num-supernodes=6 client-resources-num-cpus=4 client-resources-num-gpus=0.5 init-args-num-cpus=16"
    assert cmd[4:] == ["--run-config", 'preset="paper"', "--federation-config", federation]
    parsed = simulation_config_from_json({k.replace("-", "_"): v for k, v in parse_config_args([cmd[7]]).items()})
    assert (parsed.num_supernodes, parsed.client_resources_num_cpus, parsed.client_resources_num_gpus,
            parsed.init_args_num_cpus) == (6, 4, 0.5, 16)


def test_build_command_round_trips_through_flower_and_from_run_config():
    # Prepare
    overrides = ["federation.num-rounds=5", "tracking.wandb=off", "data.small-px=[4,12]", "run-name=r1"]

    # Execute: what flwr does with --run-config, then what the ServerApp does with it
    run_config = parse_config_args([build_command("standard", overrides, 4)[5]])
    cfg = from_run_config(run_config)

    # Assert
    assert run_config["preset"] == "standard"
    assert shlex.split(run_config["overrides"]) == overrides
    assert (cfg.preset, cfg.federation.num_rounds, cfg.tracking.wandb) == ("standard", 5, "off")
    assert cfg.data.small_px == [4, 12] and cfg.run_name == "r1"


def test_override_with_a_space_survives_the_round_trip(tmp_path):
    out_dir = str(tmp_path / "my runs")
    run_config = parse_config_args([build_command("quick", [f"output-dir={out_dir}", "run-name=r1"], 4)[5]])

    cfg = from_run_config(run_config)

    assert cfg.output_dir == out_dir


@pytest.fixture
def no_flower(monkeypatch):
    """Fail the test if cedar-simulate would start or look for a Flower process."""

    def forbidden(*args, **kwargs):
        raise AssertionError("flwr must not be started")

    monkeypatch.setattr(simulate.subprocess, "call", forbidden)
    monkeypatch.setattr(simulate, "local_superlinks", forbidden)
    monkeypatch.setattr(simulate, "stop_local_superlinks", forbidden)


@pytest.mark.parametrize("bad, named", [("train.epochz=3", "train.epochz"), ("train.batch=abc", "train.batch"),
                                        ("federation.aggregation=median", "federation.aggregation"),
                                        ("federation.num-rounds", "federation.num-rounds")])
def test_main_bad_override_returns_2_and_names_the_key(no_flower, capsys, bad, named):
    rc = simulate.main(["--preset", "quick", bad])

    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.startswith("cedar-simulate: ") and named in captured.err
    assert captured.out == ""


def test_main_unknown_preset_returns_2(no_flower, capsys):
    rc = simulate.main(["--preset", "nope"])

    assert rc == 2 and "unknown preset 'nope'" in capsys.readouterr().err


def test_main_runs_flwr_with_one_supernode_per_site(monkeypatch, tmp_path, capsys):
    # Prepare: record the command instead of running it; the "run" leaves summary.md and DONE
    calls = []

    def fake_call(cmd, env, cwd):
        calls.append((cmd, env, cwd))
        run_dir = tmp_path / "r7"
        run_dir.mkdir()
        (run_dir / "summary.md").write_text("x")
        (run_dir / "DONE").write_text("1 rounds\n")
        return 0

    monkeypatch.setattr(simulate.subprocess, "call", fake_call)
    monkeypatch.setattr(simulate, "local_superlinks", lambda: [])
    stopped = []
    monkeypatch.setattr(simulate, "stop_local_superlinks", lambda: stopped.append(1))

    # Execute: 4 quick sites + the noisy one = 5 SuperNodes
    rc = simulate.main(["--preset", "quick", "data.noisy-site=true", "run-name=r7", f"output-dir={tmp_path}"])

    # Assert
    assert rc == 0
    (cmd, env, cwd), = calls
    assert cmd == build_command("quick", ["data.noisy-site=true", f"output-dir={tmp_path}", "run-name=r7"], 5,
                                client_cpus=2)  # train.threads
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert cwd == simulate.APP_DIR
    assert stopped == [1]
    out = capsys.readouterr().out
    assert "5 sites, 3 rounds" in out and "finished" in out


def test_main_sizes_the_simulation_from_the_config(monkeypatch, tmp_path, capsys):
    """federation.client-cpus=1 and sim-cpus=3: each ClientApp reserves 1 CPU, Ray takes 3: 3 at once."""
    calls = []
    monkeypatch.setattr(simulate.subprocess, "call", lambda cmd, env, cwd: calls.append(cmd) or 1)
    monkeypatch.setattr(simulate, "local_superlinks", lambda: [])
    monkeypatch.setattr(simulate, "stop_local_superlinks", lambda: None)

    simulate.main(["federation.client-cpus=1", "federation.sim-cpus=3", "federation.client-gpus=0.25",
                   f"output-dir={tmp_path}"])

    assert calls[0][-1] == ("num-supernodes=4 client-resources-num-cpus=1 client-resources-num-gpus=0.25 "
                            "init-args-num-cpus=3")
    assert "up to 3 ClientApps at once (1 CPUs each)" in capsys.readouterr().out


def test_main_reports_failure_when_the_server_app_did_not_finish(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(simulate.subprocess, "call", lambda cmd, env, cwd: 0)  # flwr run exits 0 regardless
    monkeypatch.setattr(simulate, "local_superlinks", lambda: [])
    monkeypatch.setattr(simulate, "stop_local_superlinks", lambda: 0)

    rc = simulate.main(["run-name=r8", f"output-dir={tmp_path}"])

    assert rc == 1
    assert "FAILED" in capsys.readouterr().out


# --- per-round outputs (server.federation.RoundWriter, the strategy's on_round_end) ---------


def test_round_writer_writes_metrics_weights_graph_and_resume_state(tmp_path):
    from types import SimpleNamespace

    import numpy as np
    from flwr.app import Array, ArrayRecord

    from common import protocol as P
    from server.federation import RoundWriter
    from strategies.personalized import NodeReply, RoundRecord

    # Prepare: one student that kept site-1 and rejected cloud, evaluated as new; a fake evaluator that saves bytes
    cfg = load_config("quick", {"output-dir": str(tmp_path), "run-name": "r", "tracking.wandb": "off"})
    out = RunOutputs.create(cfg)
    saved = {}

    def save(arrays, path, **meta):
        saved[str(path.relative_to(out.run_dir))] = meta

    evaluator = SimpleNamespace(save=save)
    strategy = SimpleNamespace(state_dict=lambda: {"completed_round": 2}, arrays={"site-2": None})
    writer = RoundWriter(out, Tracker("off", "cedar", out.run_dir, {}, "r"), evaluator, strategy, cfg.kd)
    metrics = {P.TRAIN_LOSS: 1.5, P.TRAIN_SECONDS: 2.0, P.NUM_EXAMPLES: 8.0, P.VAL_MAP50: 0.3, P.TEST_MAP50: 0.4,
               P.TEST_AP50: [0.5, NAN], P.KD_LOSS: 0.125, "teachers": {"site-1": 0.5},
               "teachers_proposed": {"cloud": 0.5, "site-1": 0.5}, "teachers_rejected": ["cloud"]}
    reply = NodeReply(7, {P.SITE_ID: "site-2", P.POSITION_KM: [1.0, 0.0], P.CLASSES: [0, 1]}, metrics,
                      ArrayRecord({"w": Array(np.zeros(1, np.float32))}), benchmark={"map50": 0.25, "ap50": [0.5, NAN]},
                      phase="kd", evaluated=("new",))
    graph = {"round": 2, "mode": "all", "teachers_for": {"site-2": {"site-1": 0.5}}}

    # Execute
    writer(RoundRecord(2, [reply], graph))

    # Assert
    row, = out.read_metrics()
    assert (row["round"], row["site_id"], row["phase"], row["evaluated"]) == (2, "site-2", "kd", ["new"])
    assert row["teachers"] == {"site-1": 0.5} and row["teachers_rejected"] == ["cloud"]
    assert row["teachers_proposed"] == {"cloud": 0.5, "site-1": 0.5}
    assert (row["kd_alpha"], row["benchmark_map50"], row["benchmark_ap50"]) == (cfg.kd.alpha, 0.25, [0.5, None])
    assert saved == {"nodes/site-2/model.pt": {"round": 2, "site": "site-2"}}  # no fedavg model: no global file
    assert json.loads((out.run_dir / "graphs" / "round-002.json").read_text()) == graph
    assert json.loads((out.run_dir / "state.json").read_text()) == {"round": 2, "strategy": {"completed_round": 2},
                                                                     "sites": ["site-2"]}
    assert "| site-2 | 0.400 |" in (out.run_dir / "summary.md").read_text()


def test_round_writer_writes_a_sites_gallery_and_skips_an_image_that_does_not_decode(tmp_path, caplog):
    from types import SimpleNamespace

    import cv2
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from common import protocol as P
    from server.federation import RoundWriter
    from strategies.personalized import NodeReply, RoundRecord

    cfg = load_config("quick", {"output-dir": str(tmp_path), "run-name": "r", "tracking.wandb": "off"})
    out = RunOutputs.create(cfg)
    strategy = SimpleNamespace(state_dict=lambda: {}, arrays={})
    writer = RoundWriter(out, Tracker("off", "cedar", out.run_dir, {}, "r"), SimpleNamespace(save=lambda *a, **k: None),
                         strategy, cfg.kd)
    bgr = np.zeros((8, 12, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    png = cv2.imencode(".png", bgr)[1].tobytes()
    box = {"xyxy": [[1.0, 1.0, 5.0, 6.0]], "conf": [0.5], "cls": [0]}
    metrics = {P.TRAIN_LOSS: 1.0, P.TRAIN_SECONDS: 1.0, P.NUM_EXAMPLES: 1.0, P.VAL_MAP50: 0.3, P.TEST_MAP50: 0.4,
               P.TEST_AP50: [0.5]}
    replies = [NodeReply(k, {P.SITE_ID: f"site-{k}", P.POSITION_KM: [0.0, 0.0], P.CLASSES: [0]}, metrics,
                         ArrayRecord({"w": Array(np.zeros(1, np.float32))}),
                         gallery=[{"image": image, "gt": box, "edge": box, "cloud": None, "merged": box}])
               for k, image in ((1, png), (2, b"not an image"))]

    writer(RoundRecord(3, replies, None))

    written, = json.loads((out.run_dir / "gallery" / "site-1.json").read_text())
    assert written["merged"] == box and written["cloud"] is None
    from PIL import Image

    rgb = np.asarray(Image.open(out.run_dir / written["image"]))
    assert rgb.shape == (8, 12, 3) and rgb[0, 0].tolist() == [255, 0, 0]  # stored as RGB
    assert not (out.run_dir / "gallery" / "site-2.json").exists()
    assert any("gallery site-2 item 0: the image does not decode" in r.getMessage() for r in caplog.records)
