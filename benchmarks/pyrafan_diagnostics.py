"""What did PyraFAN learn? Gate values and fusion level weights of trained models (paper section 3).

For each trained ``yolo11n-pyrafan`` model of ``benchmarks.pyrafan_accuracy``
(``$CEDAR_HOME/models``), on the site's test images:

* the small-object gate ``a = sigmoid(GAP(X2))`` per channel: mean, min, max;
* each fusion module's per-pixel level weights ``W = softmax(...)`` averaged over
  images and pixels: the share of X2, X3 and X4 in ``F_3`` and ``F_4``.

Run (after the accuracy benchmark)::

    python -m benchmarks.pyrafan_diagnostics --preset standard --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.pyrafan_accuracy import weights_path

RESULTS = Path(__file__).resolve().parent / "results" / "pyrafan_diagnostics"


def diagnose(model, images) -> dict:
    """Gate statistics and mean fusion weights of one PyraFAN model on a batch ``(B, 3, H, W)``."""
    import torch

    from common import pyrafan as pf

    head = model.model[-1]
    gates, weights, hooks = [], {}, []
    for mod in head.modules():
        if isinstance(mod, pf.ChannelGate):
            hooks.append(mod.register_forward_hook(lambda m, inp, out: gates.append(pf.ChannelGate.attention(inp[0]))))
        if isinstance(mod, pf.LevelFusion):
            def hook(m, inp, out):
                # target index 1, 2 -> level 3, 4
                weights[f"F{m.target + 2}"] = m.level_weights(m.aligned(inp[0])).mean(dim=(0, 2, 3)).tolist()
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    g = gates[0].flatten()
    return {"gate_mean": float(g.mean()), "gate_min": float(g.min()), "gate_max": float(g.max()),
            "fusion": {k: dict(zip(("X2", "X3", "X4"), v)) for k, v in sorted(weights.items())}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--site", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=16, help="test images in the batch")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    import cv2
    import torch

    from common import yolo
    from common.benchmark import benchmark_from_config
    from common.config import load_config

    cfg = load_config(args.preset)
    bench = benchmark_from_config(cfg.data)
    epochs = cfg.train.epochs_per_round * cfg.federation.num_rounds
    paths = sorted((bench.site_dir(args.site) / "images" / "test").glob("*.png"))[: args.images]
    batch = torch.from_numpy(np.stack([cv2.imread(str(p))[:, :, ::-1] for p in paths]).copy())
    batch = batch.permute(0, 3, 1, 2).float() / 255
    rows = {}
    for seed in args.seeds:
        path = weights_path("yolo11n-pyrafan", args.site, seed, epochs, args.preset)
        rows[seed] = diagnose(yolo.load_weights(path).eval(), batch)
    lines = ["# What PyraFAN learned: gate and fusion weights", "",
             f"`python -m benchmarks.pyrafan_diagnostics {' '.join(argv if argv is not None else [])}`".rstrip()
             + f": the `yolo11n-pyrafan` models of `benchmarks.pyrafan_accuracy` (site {args.site}, {epochs} "
             f"epochs), on {len(paths)} test images. Gate ``a = sigmoid(GAP(X2))`` per channel; fusion: the mean "
             "per-pixel softmax weight of each input level in F3 (stride 8) and F4 (stride 16).", "",
             "| seed | gate mean | gate min | gate max | F3: X2 / X3 / X4 | F4: X2 / X3 / X4 |", "|---|---|---|---|---|---|"]
    for seed, r in rows.items():
        f = {k: " / ".join(f"{v:.2f}" for v in w.values()) for k, w in r["fusion"].items()}
        lines.append(f"| {seed} | {r['gate_mean']:.3f} | {r['gate_min']:.3f} | {r['gate_max']:.3f} | "
                     f"{f.get('F3', '-')} | {f.get('F4', '-')} |")
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
