"""The benchmarks' shared harness: interleaved timing and report files."""

import json

from benchmarks.harness import time_interleaved, write_report


def test_time_interleaved_warms_up_then_calls_every_runner_once_per_round():
    calls = []
    runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}

    stats = time_interleaved(runners, runs=3, warmup=2)

    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-up per runner, then round by round
    assert set(stats) == {"a", "b"}
    for s in stats.values():
        assert s["runs"] == 3 and 0 <= s["p25_ms"] <= s["median_ms"] <= s["p75_ms"]


def test_write_report_writes_json_and_markdown(tmp_path, capsys):
    write_report(tmp_path / "sub" / "r", {"x": [1, 2]}, "# table\n")

    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "sub" / "r.md").read_text() == "# table\n"
    assert capsys.readouterr().out == "# table\n\n"


def test_latency_runners_compare_an_end_to_end_model_on_its_one_to_one_branch(tmp_path):
    """YOLO26n at 128 px: torch (fused) and its ONNX export both give the one-to-one branch's (1, 300, 6) decided
    boxes, and their sorted scores agree; YOLO11n's raw (1, 4 + nc, anchors) outputs agree element-wise."""
    import numpy as np

    from benchmarks.harness import latency_runners
    from common import yolo

    x = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)
    for arch, shape in (("yolo26n", (1, 300, 6)), ("yolo11n", (1, 12, 336))):
        model = yolo.build_model(arch, nc=8, seed=0).eval()
        path = yolo.export_onnx(model, tmp_path / f"{arch}.onnx", imgsz=128)

        run_torch, run_onnx, diff = latency_runners(model, path, x, 1)

        assert run_onnx().shape == tuple(run_torch().shape) == shape
        assert diff < 1e-3
