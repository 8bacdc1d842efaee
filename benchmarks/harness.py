"""What every benchmark shares: the machine's description, interleaved latency timing, writing the report."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable, Hashable, Mapping
from copy import deepcopy
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown").strip()
    family, model = fields.get("CPU family", "").strip(), fields.get("Model", "").strip()
    return f"{name} (family {family}, model {model})" if family else name


def machine(threads: int) -> dict:
    from importlib.metadata import version

    import onnxruntime as ort
    import torch

    return {"cpu": cpu_model_name(), "logical_cpus": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "ultralytics": version("ultralytics"), "platform": platform.platform()}


def latency_runners(model, onnx_path: Path, x: np.ndarray, threads: int) -> tuple[Callable, Callable, float]:
    """Batch forward passes of ``model`` (Conv+BN fused, eval) and of its ONNX export on the input ``x``.

    Returns ``(run_torch, run_onnx, max_abs_diff)``: the raw head outputs of both (an end-to-end model's: the
    one-to-one branch's decided boxes, as exported), and how far apart they are (end-to-end: their sorted scores).
    """
    import torch

    from clients.detector import onnx_runtime
    from common.yolo import is_end2end

    runtime = onnx_runtime(onnx_path, threads)
    name = runtime.get_inputs()[0].name
    fused = deepcopy(model)
    if is_end2end(fused):  # the one-to-one branch's decided boxes, (1, 300, 6), as exported: chosen before fusing,
        fused.model[-1].end2end = True  # which drops the branch not chosen
    fused = fused.fuse(verbose=False).eval()
    x_t = torch.from_numpy(x)

    def run_torch():
        with torch.inference_mode():
            return fused(x_t)[0]

    def run_onnx():
        return runtime.run(None, {name: x})[0]

    a, b = run_onnx(), run_torch().numpy()
    if is_end2end(fused):  # decided boxes come in score order, and near-equal scores may swap rows: compare scores
        a, b = np.sort(a[..., 4], axis=-1), np.sort(b[..., 4], axis=-1)
    return run_torch, run_onnx, float(np.abs(a - b).max())


def time_interleaved(runners: Mapping[Hashable, Callable], runs: int, warmup: int) -> dict:
    """Milliseconds per call of each runner: ``{key: {"median_ms", "p25_ms", "p75_ms", "runs"}}``.

    After ``warmup`` calls each, every runner is called once per round for ``runs``
    rounds, so a change in machine load hits every cell alike.
    """
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times = {key: [] for key in runners}
    for r in range(runs):
        for key, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - t0) * 1e3)
        if (r + 1) % 10 == 0:
            log.info("round %d/%d", r + 1, runs)
    return {key: {"median_ms": float(np.median(v)), "p25_ms": float(np.percentile(v, 25)),
                  "p75_ms": float(np.percentile(v, 75)), "runs": len(v)} for key, v in times.items()}


def shown(path: Path) -> str:
    """A model path as the report names it: under ``$CEDAR_HOME`` when it is there (no machine-specific path)."""
    from common.ultralytics_env import CEDAR_HOME

    path = Path(path).resolve()
    home = Path(CEDAR_HOME).expanduser().resolve()
    return f"$CEDAR_HOME/{path.relative_to(home)}" if path.is_relative_to(home) else path.name


def write_report(out: str | Path, result: dict | list, markdown: str) -> None:
    """``<out>.json`` and ``<out>.md`` (folders made as needed); the markdown is printed too."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
