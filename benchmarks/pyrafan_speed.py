"""PyraFAN cost: parameters, GFLOPs at 640 px, and CPU latency per image (torch and ONNX Runtime).

Models are built from YAML with the built-in benchmark's 8 classes. GFLOPs come from
Ultralytics' ``get_flops`` (THOP: conv, BN, linear and ``nn`` layers; functional ops such
as PyraFAN's softmax, weighted sum and nearest resize are not counted; they are a
few MFLOPs). Latency is one forward pass of a batch-1 image to the raw head output
(box decoding included, NMS excluded), after Conv+BN fusion, in eval mode, with
``--threads`` intra-op threads for both runtimes. All (model, size, runtime) cells are
measured in one process, interleaved round by round after a warm-up, so a change in
machine load hits every cell alike; the table gives the median of ``--runs`` rounds and
the inter-quartile range.

Run::

    python -m benchmarks.pyrafan_speed                 # writes benchmarks/results/pyrafan_speed.{md,json}
    python -m benchmarks.pyrafan_speed --runs 10 --out /tmp/speed
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.harness import latency_runners, machine, time_interleaved, write_report

log = logging.getLogger("benchmarks.pyrafan_speed")

MODELS = ("yolo11n", "yolo11n-p2", "yolo11n-pyrafan", "yolo11n-pyrafan2", "yolo26n", "yolo26n-p2", "yolo26n-pyrafan2",
          "yolo11s", "yolo11s-pyrafan")
SIZES = (320, 640)
NC = 8  # the built-in benchmark's classes
RESULTS = Path(__file__).resolve().parent / "results" / "pyrafan_speed"


def measure(models: list[str], sizes: list[int], runs: int, warmup: int, threads: int, workdir: Path) -> dict:
    import torch

    from common import yolo

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    inputs = {s: rng.random((1, 3, s, s), dtype=np.float32) for s in sizes}

    info, runners = {}, {}
    for arch in models:
        model = yolo.build_model(arch, nc=NC, seed=0).eval()
        info[arch] = {"params": yolo.count_parameters(model), "gflops_640": round(yolo.gflops(model, 640), 2),
                      "strides": [int(s) for s in model.stride.tolist()]}
        for size in sizes:
            path = yolo.export_onnx(model, workdir / f"{arch}-{size}.onnx", imgsz=size)
            run_torch, run_onnx, diff = latency_runners(model, path, inputs[size], threads)
            info[arch][f"onnx_max_abs_diff_{size}"] = diff
            runners[(arch, size, "torch")] = run_torch
            runners[(arch, size, "onnxruntime")] = run_onnx
        log.info("%s: %d params, %.2f GFLOPs at 640, exported", arch, info[arch]["params"], info[arch]["gflops_640"])

    latency = {f"{arch}|{size}|{rt}": v for (arch, size, rt), v in time_interleaved(runners, runs, warmup).items()}
    return {"models": info, "latency": latency}


def to_markdown(result: dict) -> str:
    m, sizes, models = result["machine"], result["sizes"], list(result["models"])
    lines = [
        "# PyraFAN: parameters, GFLOPs and CPU latency",
        "",
        f"Measured {result['date']} by `python -m benchmarks.pyrafan_speed` on **{m['cpu']}**, "
        f"{m['logical_cpus']} logical CPUs (KVM guest), {m['threads']} threads for torch and ONNX Runtime; "
        f"torch {m['torch']}, ONNX Runtime {m['onnxruntime']}, Ultralytics {m['ultralytics']}. "
        f"Load average {result['load_before'][0]:.2f} before and {result['load_after'][0]:.2f} after "
        "(compare rows with each other rather than with other machines).",
        "",
        f"nc = {result['nc']} (the built-in benchmark). Params and GFLOPs of the unfused model at 640 px "
        "(Ultralytics' `get_flops`/THOP). Latency: batch 1, Conv+BN fused, eval, raw head output "
        f"(no NMS; YOLO26's one-to-one branch with its top-300 decided boxes, as exported); median of {result['runs']} interleaved rounds after {result['warmup']} warm-up runs "
        "per cell, [p25-p75] in brackets.",
        "",
    ]
    head = "| model | strides | params | GFLOPs@640 | " + " | ".join(
        f"torch {s} ms | ORT {s} ms" for s in sizes) + " |"
    lines += [head, "|" + "---|" * (4 + 2 * len(sizes))]
    for arch in models:
        info = result["models"][arch]
        strides = "/".join(map(str, info["strides"]))
        cells = [arch, strides, f"{info['params'] / 1e6:.3f} M", f"{info['gflops_640']:.2f}"]
        for s in sizes:
            for rt in ("torch", "onnxruntime"):
                c = result["latency"][f"{arch}|{s}|{rt}"]
                cells.append(f"{c['median_ms']:.1f} [{c['p25_ms']:.1f}-{c['p75_ms']:.1f}]")
        lines.append("| " + " | ".join(cells) + " |")
    worst = max(v for info in result["models"].values() for k, v in info.items() if k.startswith("onnx_max"))
    lines += [
        "",
        f"ONNX Runtime vs torch (fused) output: max abs difference {worst:.1e} over all models and sizes "
        "(boxes in pixels, scores in [0, 1]; YOLO26 models: their sorted scores).",
        "",
        "Rows: `yolo11n`/`yolo11s` are Ultralytics' YOLO11 (P3-P5 heads); `yolo11n-p2` is YOLO11n's backbone "
        "with a P2-P4 neck and a stock Detect head (`conf/models/yolo11n-p2.yaml`, the ablation baseline); "
        "`*-pyrafan` have the same backbone and neck and the PyraFAN head (`common/pyrafan.py`); `*-pyrafan2` "
        "PyraFAN v2 (learned gate, residual fusion, Detect branches after fusion; `conf/models/*-pyrafan2.yaml`); "
        "`yolo26n` and `yolo26n-p2` are Ultralytics' YOLO26 YAMLs (NMS-free one-to-one head).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    ap.add_argument("--runs", type=int, default=30, help="timed rounds (median over these)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs per cell first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS), help="output path without suffix (.md and .json are written)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cedar-speed-") as tmp:
        measured = measure(args.models, args.sizes, args.runs, args.warmup, args.threads, Path(tmp))
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(args.threads),
              "nc": NC, "sizes": args.sizes, "runs": args.runs, "warmup": args.warmup,
              "load_before": load_before, "load_after": os.getloadavg(), **measured}
    write_report(args.out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
