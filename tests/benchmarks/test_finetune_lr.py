"""The continuation learning-rate benchmark's report, from hand-built runs."""

from benchmarks import finetune_lr


def test_report_gives_means_and_cloud_gain_per_seed():
    runs = [{"name": n, "seed": s, "lr": lr, "final_test_map50": {"site-0": v, "site-1": v}}
            for (n, s, lr), v in {("none", 0, 0.01): 0.25, ("none", 1, 0.01): 0.4, ("cloud", 0, 0.01): 0.3,
                                  ("cloud", 1, 0.01): 0.2, ("none", 0, 0.002): 0.5, ("none", 1, 0.002): 0.5,
                                  ("cloud", 0, 0.002): 0.55, ("cloud", 1, 0.002): 0.5}.items()]
    meta = {"command": "c", "machine": "m", "date": "d", "wall_s": 60.0, "cached": 0, "workers": 2,
            "preset": "standard", "lrs": [0.01, 0.002], "seeds": [0, 1], "variants": ["none", "cloud"], "epochs": 3,
            "base": {0: 0.1, 1: 0.2}}

    md = finetune_lr.to_markdown(runs, meta)

    # none at 0.01: 0.25 and 0.4 -> mean 0.325, sample std 0.15 / sqrt(2) = 0.106
    assert "| none | 0.250 | 0.400 | 0.500 | 0.500 | 0.325 ± 0.106 | 0.500 ± 0.000 |" in md
    # cloud vs none: 0.3 / 0.25 - 1 = +20 %, 0.2 / 0.4 - 1 = -50 % -> -15 %; 0.55 / 0.5 - 1 = +10 %, 0 -> +5 %
    assert "| 0.01 | +20.0% | -50.0% | -15.0% |" in md
    assert "| 0.002 | +10.0% | +0.0% | +5.0% |" in md
