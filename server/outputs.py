"""The run folder ``outputs/<run>/``: everything a run leaves behind.

::

    config.yaml          the resolved configuration
    metrics.jsonl        one JSON line per node per round
    nodes/<site>/model.pt  each site's latest weights (state dict, common.yolo.save_weights)
    summary.md           per-site table: mAP50 per round, on its own test set and the benchmark
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from common.config import CedarConfig, save_config


def make_run_dir(cfg: CedarConfig) -> Path:
    """``<output_dir>/<run_name>``, default ``<preset>-<timestamp>`` (never reused by accident)."""
    name = cfg.run_name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.output_dir).expanduser() / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class RunOutputs:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"

    @classmethod
    def create(cls, cfg: CedarConfig) -> "RunOutputs":
        out = cls(make_run_dir(cfg))
        save_config(cfg, out.run_dir / "config.yaml")
        return out

    def node_weights_path(self, site_id: str) -> Path:
        return self.run_dir / "nodes" / site_id / "model.pt"

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(_jsonable(record)) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def write_summary(self, keys: tuple[str, ...] = ("test_map50", "benchmark_map50")) -> Path:
        """A markdown table per metric: one row per site, one column per round."""
        rows = self.read_metrics()
        sites = sorted({r["site_id"] for r in rows})
        rounds = sorted({r["round"] for r in rows})
        lines = [f"# Run summary: {self.run_dir.name}", ""]
        for key in keys:
            lines += [f"## {key}", "", "| site | " + " | ".join(f"round {r}" for r in rounds) + " |",
                      "|---|" + "---|" * len(rounds)]
            for site in sites:
                vals = {r["round"]: r.get(key) for r in rows if r["site_id"] == site}
                cells = [f"{vals[r]:.3f}" if isinstance(vals.get(r), (int, float)) else "-" for r in rounds]
                lines.append(f"| {site} | " + " | ".join(cells) + " |")
            lines.append("")
        path = self.run_dir / "summary.md"
        path.write_text("\n".join(lines))
        return path


def _jsonable(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
