"""Draw one round's collaboration graph (``GraphKDStrategy.graph_record``) as a figure or a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TEACHER = "tab:orange"
STUDENT = "tab:blue"
UNUSED = "tab:gray"


def graph_figure(record: dict[str, Any]):
    """Sites at their positions (km); arc i->j (i leans on j) with width ~ normalised weight.

    Teachers are orange; an arc a student learns over this round (``teachers_for``) is orange
    and solid, every other arc grey. Returns a matplotlib figure (the caller closes it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    nodes = {n["id"]: n for n in record.get("nodes", [])}
    teachers = set(record.get("teachers", []))
    taught = {(s, t) for s, ts in (record.get("teachers_for") or {}).items() for t in ts}
    fig, ax = plt.subplots(figsize=(5, 4.4), dpi=100)
    for arc in record.get("arcs", []):
        (x0, y0), (x1, y1) = nodes[arc["source"]]["position"], nodes[arc["target"]]["position"]
        used = (arc["source"], arc["target"]) in taught
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="->", lw=0.5 + 4 * float(arc["weight"] or 0),
                                    alpha=0.9 if used else 0.45, color=TEACHER if used else UNUSED,
                                    connectionstyle="arc3,rad=0.12", shrinkA=9, shrinkB=9))
    for node_id, node in nodes.items():
        x, y = node["position"]
        ax.scatter([x], [y], s=300, color=TEACHER if node_id in teachers else STUDENT, zorder=3)
        ax.annotate(f"{node_id}\nd={node.get('degree') or 0:.2f}", (x, y), textcoords="offset points",
                    xytext=(11, 0), ha="left", va="center", fontsize=7)
    ax.legend(handles=[Line2D([], [], marker="o", ls="", color=TEACHER, label="teacher"),
                       Line2D([], [], marker="o", ls="", color=STUDENT, label="other site"),
                       Line2D([], [], color=TEACHER, label="student -> teacher (KD)"),
                       Line2D([], [], color=UNUSED, label="arc, width ~ weight")],
              fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.set_xlabel("x (km)")
    ax.set_ylabel("y (km)")
    ax.set_title(f"round {record.get('round')}: teachers {sorted(teachers)}", fontsize=9)
    ax.set_aspect("equal", adjustable="datalim")
    ax.margins(0.3)
    fig.tight_layout()
    return fig


def draw_graph(record: dict[str, Any], path: Path) -> Path:
    """:func:`graph_figure` saved as a PNG at ``path``."""
    fig = graph_figure(record)
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
