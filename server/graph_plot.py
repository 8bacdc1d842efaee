"""Draw one round's collaboration graph (``GraphKDStrategy.graph_record``) as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw_graph(record: dict[str, Any], path: Path) -> Path:
    """Sites at their positions (km), arcs i->j with width ~ normalised weight, teachers in orange."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = {n["id"]: n for n in record.get("nodes", [])}
    teachers = set(record.get("teachers", []))
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for arc in record.get("arcs", []):
        (x0, y0), (x1, y1) = nodes[arc["source"]]["position"], nodes[arc["target"]]["position"]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="->", lw=0.5 + 4 * float(arc["weight"] or 0), alpha=0.6,
                                    color="tab:orange" if arc["target"] in teachers else "tab:gray",
                                    connectionstyle="arc3,rad=0.12"))
    for node_id, node in nodes.items():
        x, y = node["position"]
        ax.scatter([x], [y], s=300, color="tab:orange" if node_id in teachers else "tab:blue", zorder=3)
        ax.annotate(f"{node_id}\nd={node.get('degree') or 0:.2f}", (x, y), textcoords="offset points",
                    xytext=(0, 14), ha="center", fontsize=7)
    ax.set_xlabel("x (km)")
    ax.set_ylabel("y (km)")
    ax.set_title(f"round {record.get('round')}: teachers {sorted(teachers)}", fontsize=9)
    ax.set_aspect("equal", adjustable="datalim")
    ax.margins(0.25)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
