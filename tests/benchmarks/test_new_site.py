"""The new-site benchmark (benchmarks.new_site): its arithmetic by hand, and one tiny run end to end."""

import json

import pytest
import torch

from benchmarks import new_site


def test_average_takes_half_its_own_weights_and_half_the_teachers_weighted_mean():
    """own 4, teachers 0 (weight 3) and 8 (weight 1): 0.5 * 4 + 0.5 * (0.75 * 0 + 0.25 * 8) = 3; a counter stays."""
    own = {"w": torch.tensor([4.0]), "n": torch.tensor(7)}
    teachers = [{"w": torch.tensor([0.0]), "n": torch.tensor(1)}, {"w": torch.tensor([8.0]), "n": torch.tensor(2)}]

    out = new_site.average(own, teachers, [3.0, 1.0])

    assert out["w"].tolist() == [3.0] and out["n"].item() == 7


def test_rounds_to_reach_is_the_first_round_at_or_above_the_target():
    assert new_site.rounds_to_reach([0.1, 0.45, 0.5], 0.45) == 2
    assert new_site.rounds_to_reach([0.1, 0.2], 0.45) is None


def test_the_reports_command_reproduces_every_run_it_holds_whichever_calls_made_them():
    """Runs of L 16 (seeds 0, 1) and L 64 (seed 2), two arms on the test site only, made with --rounds 2."""
    import argparse

    runs = [{"arm": arm, "site": "site-3", "labelled": labelled, "seed": seed}
            for arm in ("alone", "warm") for labelled, seed in ((16, 0), (16, 1), (64, 2))]
    args = argparse.Namespace(rounds=2, epochs=4, established_rounds=2, set=[])

    assert new_site.command(runs, args) == "--labelled 16 64 --seeds 0 1 2 --arms alone warm --sites 3 --rounds 2"
    every = [{**r, "arm": arm, "site": site} for r in runs[:1] for arm in new_site.ARMS for site in ("site-3", "site-4")]
    assert new_site.command(every, argparse.Namespace(rounds=3, epochs=4, established_rounds=2, set=["a=1"])) == (
        "--labelled 16 --seeds 0 --set a=1")


def test_the_table_gives_each_arms_curve_its_gain_over_alone_and_the_rounds_to_90_percent_of_the_sibling():
    """Sibling site-2 at 0.5 (target 0.45). Alone: seeds end at 0.2 and 0.3 (mean 0.25, sd 0.071); KD: 0.3 and
    0.46 (mean 0.38, sd 0.113, 0.38 / 0.25 - 1 = +52.0 %), reaching 0.45 never and in round 3."""
    def run(arm, seed, curve):
        return {"arm": arm, "site": "site-3", "labelled": 32, "seed": seed, "curve": curve,
                "teachers": {"site-2": 0.75, "site-0": 0.25}}

    runs = [run("alone", 0, [0.1, 0.15, 0.2]), run("alone", 1, [0.1, 0.2, 0.3]),
            run("kd-unlabelled", 0, [0.2, 0.25, 0.3]), run("kd-unlabelled", 1, [0.3, 0.4, 0.46])]
    settings = {"argv": "", "machine": "m", "established_rounds": 2, "epochs": 4, "rounds": 3,
                "unlabelled_frames": 40, "train_images": 64, "test_images": 16}

    md = new_site.summarise(runs, {"site-0": 0.4, "site-1": 0.3, "site-2": 0.5}, settings)

    assert "L = 32 labelled images; teachers: site-0 0.25, site-2 0.75" in md
    assert "| (a) alone, from the base model | 2 | 0.100 / 0.175 / 0.250 | 0.250 ± 0.071 | +0.0 % | never, never |" in md
    assert "| (e) graph KD + unlabelled frames | 2 | 0.250 / 0.325 / 0.380 | 0.380 ± 0.113 | +52.0 % | never, 3 |" in md
    assert "rounds to 90 % of site-2 (0.450)" in md


@pytest.mark.slow
def test_a_tiny_run_trains_the_arms_writes_the_report_and_resumes(tmp_path, monkeypatch):
    """Five tiny sites, 1 established round, one round per arm: the teachers are fixed (site-2 alone: on tiny
    untrained models the graph ranks nobody above the joining site); a second call runs nothing again."""
    sets = ["data.imgsz=128", "train.imgsz=128", "data.train-per-site=8", "data.val-per-site=4",
            "data.test-per-site=4", "data.public-per-site=4", "data.public-train-per-site=4", "data.video-frames=12",
            f"data.cache-dir={tmp_path / 'cache'}", "model.base-epochs=1", "model.cloud-epochs=1", "train.batch=4",
            "eval.batch=4", "train.warmup-iters=2", "kd.unlabelled-frames=4"]
    argv = ["--labelled", "4", "--seeds", "0", "--arms", "alone", "warm-kd-unlabelled", "library", "--sites", "3",
            "--rounds", "1", "--epochs", "1", "--established-rounds", "1", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out" / "new_site"), "--set", *sets]
    monkeypatch.setattr(new_site.Federation, "teachers_for", lambda self, joining: {"site-2": 1.0})
    calls = []
    real = new_site.run_arm
    monkeypatch.setattr(new_site, "run_arm", lambda fed, arm, *a: calls.append(arm) or real(fed, arm, *a))

    new_site.main(argv)
    new_site.main(argv)

    assert calls == ["alone", "warm-kd-unlabelled", "library"]
    runs = [json.loads(line) for line in (tmp_path / "out" / "new_site.jsonl").read_text().splitlines()]
    assert [(r["arm"], r["site"], r["labelled"], len(r["curve"])) for r in runs] == [
        ("alone", "site-3", 4, 1), ("warm-kd-unlabelled", "site-3", 4, 1), ("library", "site-3", 4, 1)]
    assert runs[0]["rounds"][0]["transfer-frames"] is None  # alone: no transfer set
    assert runs[1]["rounds"][0]["transfer-frames"] == 4  # 4 of the 12 video frames joined its KD round
    assert runs[2]["rounds"][0]["transfer-frames"] is None  # the library's distillation: labelled images only
    md = (tmp_path / "out" / "new_site.md").read_text()
    assert "| (a) alone, from the base model | 1 |" in md and "| (f) (c) + (e) | 1 |" in md
    assert "| Ultralytics' distill_model, top teacher | 1 |" in md
    assert (tmp_path / "out" / "new_site.png").stat().st_size > 0
