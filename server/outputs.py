"""The run folder ``outputs/<run>/``: everything a run leaves behind.

::

    config.yaml          the resolved configuration
    metrics.jsonl        one JSON line per node per round
    nodes/<site>/model.pt  each site's latest weights (state dict, common.yolo.save_weights)
    state.json           what a resumed run continues from (server.federation.RoundWriter)
    bindings.json        {site id: node id}: the node each site is bound to (strategies.personalized)
    summary.md           per-site table: mAP50 per round, on its own test set and the benchmark
    report.html          the run report (server.report)
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from common.config import CedarConfig, save_config

log = logging.getLogger(__name__)


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
        lines = [f"# Run summary: {self.run_dir.name}", ""]
        for key in keys:
            sites, rounds, values = per_site_round(rows, key)
            lines += [f"## {key}", "", "| site | " + " | ".join(f"round {r}" for r in rounds) + " |",
                      "|---|" + "---|" * len(rounds)]
            for site in sites:
                cells = ["-" if values[site].get(r) is None else f"{values[site][r]:.3f}" for r in rounds]
                lines.append(f"| {site} | " + " | ".join(cells) + " |")
            lines.append("")
        path = self.run_dir / "summary.md"
        path.write_text("\n".join(lines))
        return path

    def finish(self, tracker=None) -> Path | None:
        """End of a run: write the summary and the report (its figures to ``tracker``), print the summary table
        and the report's path. A report that cannot be built is logged, not raised: the run itself is complete."""
        from server.report import build_report

        summary = self.write_summary()
        log.info("summary (%s):\n%s", summary, summary.read_text().strip())
        try:
            path = build_report(self.run_dir, tracker)
        except Exception:  # noqa: BLE001
            log.exception("report: cannot build it; rebuild with: python -m server.report %s", self.run_dir)
            return None
        log.info("report: %s (rebuild: python -m server.report %s)", path.resolve(), self.run_dir)
        return path


def per_site_round(rows: list[dict[str, Any]], key: str) -> tuple[list[str], list[int], dict[str, dict[int, float]]]:
    """``(sites, rounds, {site: {round: value}})`` of one numeric metric; missing or non-numeric values are left out.

    >>> per_site_round([{"site_id": "b", "round": 2, "m": 0.5}, {"site_id": "a", "round": 1, "m": None}], "m")
    (['a', 'b'], [1, 2], {'a': {}, 'b': {2: 0.5}})
    """
    sites = sorted({r["site_id"] for r in rows})
    rounds = sorted({r["round"] for r in rows})
    values: dict[str, dict[int, float]] = {s: {} for s in sites}
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            values[r["site_id"]][r["round"]] = float(v)
    return sites, rounds, values


def _jsonable(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
