"""Tests for common.config: presets, precedence, overrides and loud errors naming the key."""

import dataclasses

import pytest
import yaml
from omegaconf import OmegaConf

from common.config import (
    CedarConfig,
    ConfigError,
    from_run_config,
    load_config,
    parse_overrides,
    parse_value,
    save_config,
    to_flat_dict,
)
from tests import REPO

# --- presets --------------------------------------------------------------------------------


def test_quick_preset_values():
    # Execute
    cfg = load_config("quick")

    # Assert: conf/quick.yaml over conf/base.yaml over the schema
    assert cfg.preset == "quick"
    assert (cfg.data.num_sites, cfg.data.imgsz, cfg.data.train_per_site, cfg.data.video_frames) == (4, 256, 48, 40)
    assert (cfg.train.imgsz, cfg.train.batch, cfg.train.epochs_per_round) == (256, 8, 4)
    assert cfg.federation.num_rounds == 3
    assert (cfg.model.base_epochs, cfg.model.cloud, cfg.model.cloud_epochs) == (40, "yolo11n", 40)
    assert cfg.data.similar_pairs and cfg.kd.teacher_scope == "local" and cfg.kd.mode == "graph"
    assert cfg.train.device == "cpu"
    assert cfg.tracking.wandb == "offline"


def test_standard_preset_values():
    cfg = load_config("standard")

    assert cfg.preset == "standard"
    assert (cfg.data.imgsz, cfg.data.train_per_site, cfg.data.test_per_site, cfg.data.public_per_site) == (
        320, 160, 48, 24)
    assert (cfg.train.imgsz, cfg.train.epochs_per_round, cfg.federation.num_rounds) == (320, 5, 5)


def test_paper_preset_values():
    cfg = load_config("paper")

    assert cfg.preset == "paper"
    assert (cfg.data.num_sites, cfg.data.imgsz, cfg.data.train_per_site) == (6, 640, 800)
    assert cfg.data.small_px == [8, 15] and cfg.data.large_px == [16, 48]
    assert (cfg.train.batch, cfg.train.workers, cfg.train.threads) == (32, 8, 8)
    # a GPU index stays a string: the schema field is str
    assert cfg.train.device == "0"
    assert cfg.federation.num_rounds == 10


def test_default_preset_is_quick_and_preset_override_selects_one():
    assert load_config().preset == "quick"
    assert load_config(None, {"preset": "paper"}).data.imgsz == 640


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError) as info:
        load_config("qiuck")

    msg = str(info.value)
    assert "qiuck" in msg
    for known in ("paper", "quick", "standard"):
        assert known in msg
    assert "base" not in msg.split("known:")[1]


# --- precedence -----------------------------------------------------------------------------


def test_precedence_schema_base_preset_overrides(tmp_path):
    # Prepare: each layer sets one more key than the one below it
    (tmp_path / "base.yaml").write_text("train:\n  batch: 4\n  lr0: 0.02\n  workers: 1\n")
    (tmp_path / "mine.yaml").write_text("train:\n  lr0: 0.03\n  workers: 2\neval:\n  batch: 5\n")

    # Execute
    cfg = load_config("mine", {"train.workers": 3}, conf_dir=tmp_path)

    # Assert
    assert cfg.train.imgsz == 320  # schema default (no layer sets it)
    assert cfg.train.batch == 4  # base.yaml
    assert cfg.train.lr0 == 0.03  # preset over base
    assert cfg.eval.batch == 5  # preset over schema
    assert cfg.train.workers == 3  # override over preset over base
    assert cfg.preset == "mine"


def test_overrides_beat_the_shipped_preset():
    cfg = load_config("quick", {"train.imgsz": 128, "data.imgsz": 96})

    assert cfg.train.imgsz == 128 and cfg.data.imgsz == 96
    assert cfg.train.batch == 8  # untouched quick value


def test_kebab_case_and_snake_case_keys_are_the_same_key():
    kebab = load_config("quick", {"federation.num-rounds": 7, "train.epochs-per-round": 2})
    snake = load_config("quick", {"federation.num_rounds": 7, "train.epochs_per_round": 2})

    assert kebab.federation.num_rounds == snake.federation.num_rounds == 7
    assert kebab.train.epochs_per_round == snake.train.epochs_per_round == 2


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides({"a.b-c.d": 1, "a.e": 2, "f": 3}) == {"a": {"b_c": {"d": 1}, "e": 2}, "f": 3}


def test_string_values_are_converted_by_the_schema():
    cfg = load_config("quick", {"train.batch": "4", "train.lr0": "0.5", "data.noisy-site": "true"})

    assert cfg.train.batch == 4 and isinstance(cfg.train.batch, int)
    assert cfg.train.lr0 == 0.5
    assert cfg.data.noisy_site is True


# --- run config -----------------------------------------------------------------------------


def test_from_run_config_preset_and_overrides_string():
    # Execute
    cfg = from_run_config({"preset": "standard",
                           "overrides": "federation.num-rounds=5 tracking.wandb=off data.small-px=[1,2]"})

    # Assert
    assert cfg.preset == "standard"
    assert cfg.federation.num_rounds == 5
    assert cfg.tracking.wandb == "off"  # a string, not YAML 1.1's False
    assert cfg.data.small_px == [1, 2]
    assert cfg.data.imgsz == 320  # the standard preset is really used


def test_from_run_config_extra_keys_are_overrides_and_win_over_the_string():
    cfg = from_run_config({"preset": "quick", "overrides": "train.batch=2", "train.batch": 3, "seed": 9})

    assert cfg.train.batch == 3
    assert cfg.seed == 9


def test_from_run_config_empty_uses_quick():
    cfg = from_run_config({"preset": "", "overrides": ""})

    assert cfg.preset == "quick"
    assert cfg.data.imgsz == 256


def test_from_run_config_item_without_equals_is_named():
    with pytest.raises(ConfigError, match="'federation.num-rounds' is not key=value"):
        from_run_config({"overrides": "federation.num-rounds"})


def test_parse_value():
    assert parse_value("off") == "off"
    assert parse_value(" 5 ") == "5"
    assert parse_value("[1, 2]") == [1, 2]
    with pytest.raises(ConfigError, match="not a valid list"):
        parse_value("[1, 2")


# --- errors name the key --------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"train.epochz": 3}, "train.epochz"),
        ({"federation.num_round": 2}, "federation.num_round"),
        ({"federation.num-round": 2}, "federation.num_round"),
        ({"dat.imgsz": 2}, "dat"),
    ],
)
def test_misspelled_key_is_named(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config("quick", overrides)

    assert key in str(info.value)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"train.batch": "abc"}, "train.batch"),
        ({"train.batch": 2.5}, "train.batch"),
        ({"data.small-px": "5"}, "data.small_px"),
        ({"data.objects-per-image": [1, "x"]}, "data.objects_per_image"),
    ],
)
def test_wrong_type_is_named(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config("quick", overrides)

    assert key in str(info.value)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"data.small_fraction": 1.5}, "data.small_fraction"),
        ({"data.occlusion-prob": -0.1}, "data.occlusion_prob"),
        ({"federation.aggregation": "median"}, "federation.aggregation"),
        ({"federation.fraction-train": 0}, "federation.fraction_train"),
        ({"federation.fraction-train": 1.5}, "federation.fraction_train"),
        ({"tracking.wandb": "maybe"}, "tracking.wandb"),
        ({"data.num-sites": 0}, "data.num_sites"),
        ({"train.epochs-per-round": -1}, "train.epochs_per_round"),
        ({"train.finetune-lr0": 0}, "train.finetune_lr0"),
        ({"kd.select": "everything"}, "kd.select"),
        ({"kd.new-node-init": "peer"}, "kd.new_node_init"),
        ({"kd.pseudo-conf": 1.5}, "kd.pseudo_conf"),
        ({"kd.unlabelled-frames": -1}, "kd.unlabelled_frames"),
        ({"data.small-px": [15, 5]}, "data.small_px"),
        ({"data.large-px": [16]}, "data.large_px"),
        ({"data.source": "yolo"}, "data.site_data"),
        ({"data.source": "yolo", "data.site-data": ["a.yaml"]}, "data.public_data"),
        ({"federation.late-sites": [4]}, "federation.late_sites"),  # 4 sites: indices -4..3
        ({"federation.late-sites": [3, -1]}, "federation.late_sites"),  # the same site twice
        ({"federation.late-join-round": 0}, "federation.late_join_round"),
        ({"kd.graph-top-k": -1}, "kd.graph_top_k"),
    ],
)
def test_out_of_range_value_is_named(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config("quick", overrides)

    assert key in str(info.value)


def test_out_of_range_message_shows_the_value_and_choices():
    with pytest.raises(ConfigError) as info:
        load_config("quick", {"federation.aggregation": "median"})

    assert "'median'" in str(info.value) and "fedavg" in str(info.value)


def test_scalar_over_a_section_is_named():
    with pytest.raises(ConfigError) as info:
        load_config("quick", {"data": 3})

    assert "data" in str(info.value)


def test_epochs_per_round_zero_is_allowed():
    # the range check is ">= 0": 0 means evaluate-only rounds
    assert load_config("quick", {"train.epochs-per-round": 0}).train.epochs_per_round == 0


# --- saving and flattening ------------------------------------------------------------------


def test_save_config_round_trip(tmp_path):
    # Prepare: values that YAML 1.1 would mangle if written unquoted ("off" -> False, "0" -> 0)
    cfg = load_config("paper", {"tracking.wandb": "off", "run-name": "r1", "data.small-px": [6, 14]})

    # Execute
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    reloaded = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CedarConfig), OmegaConf.load(path)))
    plain = yaml.safe_load(path.read_text())

    # Assert
    assert path == tmp_path / "sub" / "config.yaml"
    assert reloaded == cfg
    assert plain["tracking"]["wandb"] == "off"  # readable by plain YAML tools as well
    assert plain["train"]["device"] == "0"
    assert plain["data"]["small_px"] == [6, 14]
    assert plain["run_name"] == "r1" and plain["preset"] == "paper"


def test_saved_config_reloads_as_a_preset(tmp_path):
    # Prepare: the saved file used as the preset of an empty base
    cfg = load_config("standard", {"federation.num-rounds": 7, "train.lr0": 0.002})
    save_config(cfg, tmp_path / "saved.yaml")
    (tmp_path / "base.yaml").write_text("{}\n")

    # Execute
    again = load_config("saved", conf_dir=tmp_path)

    # Assert: everything but the preset's name comes back
    assert to_flat_dict(again) == {**to_flat_dict(cfg), "preset": "saved"}


def test_to_flat_dict():
    cfg = load_config("quick", {"train.batch": 3})

    flat = to_flat_dict(cfg)

    assert flat["train.batch"] == 3
    assert flat["data.imgsz"] == 256
    assert flat["preset"] == "quick"
    assert flat["data.small_px"] == [4, 12]
    assert "train" not in flat and "data" not in flat  # only leaves

    def leaves(cls, prefix=""):
        out = []
        for f in dataclasses.fields(cls):
            sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if sub is not None and dataclasses.is_dataclass(sub):
                out += leaves(sub, f"{prefix}{f.name}.")
            else:
                out.append(f"{prefix}{f.name}")
        return out

    assert sorted(flat) == sorted(leaves(CedarConfig))


def test_conf_dir_presets_all_load():
    conf = REPO / "conf"
    for path in sorted(conf.glob("*.yaml")):
        if path.stem != "base":
            assert load_config(path.stem).preset == path.stem


def test_quick_preset_runs_graph_kd_a_cloud_round_and_a_late_site_and_each_turns_off():
    cfg = load_config("quick")
    off = load_config("quick", {"kd.mode": "none", "kd.cloud-rounds": [], "federation.late-sites": []})

    assert (cfg.kd.mode, cfg.kd.cloud_rounds, cfg.federation.late_sites, cfg.federation.late_join_round) == \
        ("graph", [3], [-1], 2)
    assert (off.kd.mode, off.kd.cloud_rounds, off.federation.late_sites) == ("none", [], [])
    assert load_config("standard").federation.late_sites == []


@pytest.mark.parametrize("bad", ["bytes=4000", "recall:2", "frame:-0.1", "quarter"])
def test_routing_budget_error_names_the_bad_value(bad):
    with pytest.raises(ConfigError, match=f"routing.budget='{bad}': expected '' \\(none\\), 'bytes:X'"):
        load_config("quick", {"routing.budget": bad})
    assert load_config("quick", {"routing.budget": "recall:0.6"}).routing.budget == "recall:0.6"


def test_data_unlabelled_names_one_source_per_site_at_most(tmp_path):
    yaml_file = tmp_path / "data.yaml"
    yaml_file.write_text("names: [a]\n")
    overrides = {"data.source": "yolo", "data.site-data": [str(yaml_file)], "data.public-data": str(yaml_file)}
    assert load_config("quick", {**overrides, "data.unlabelled": ["v.mp4"]}).data.unlabelled == ["v.mp4"]
    with pytest.raises(ConfigError, match=r"data.unlabelled=\['a.mp4', 'b.mp4'\]: names 2 sources for 1 sites"):
        load_config("quick", {**overrides, "data.unlabelled": ["a.mp4", "b.mp4"]})
