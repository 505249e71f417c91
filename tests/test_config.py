"""The config tree: presets load, overrides apply, and bad values fail naming key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, flatten, from_dict, load_config, save_config, to_dict

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert cfg.data.image_size == cfg.model.image_size


def test_presets_derive_not_copy():
    derived = load_config(CONFIGS[0].parent / "msa.yaml")
    assert derived.model.peft == ["msa_adapter"]
    assert derived.train.interaction_steps == 9  # from sam_med2d.yaml


def test_overrides_and_yaml_values():
    cfg = load_config(
        CONFIGS[0].parent / "debug.yaml",
        ["train.lr=3e-3", "model.peft=[lora, fact]", "train.steps=7", "tracking.uri="],
    )
    assert cfg.train.lr == 0.003 and cfg.model.peft == ["lora", "fact"] and cfg.train.steps == 7
    assert cfg.tracking.uri == ""


def test_round_trip(tmp_path):
    cfg = load_config(CONFIGS[0].parent / "debug.yaml")
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg) == to_dict(from_dict(to_dict(cfg)))
    assert flatten(cfg)["model.arch"] == "tiny"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "command line: unknown key 'train.stepz'"),
        ("train.steps=abc", "command line: train.steps must be an integer, got 'abc'"),
        ("train.steps=true", "train.steps must be an integer"),
        ("model.head=unet", "model.head must be one of"),
        ("model.peft=[lora, lora]", "model.peft lists a method twice"),
        ("sharding.val_fraction=1.5", "sharding.val_fraction must be in [0, 1], got 1.5"),
        ("data.image_size=512", "data.image_size (512) must equal model.image_size"),
        ("train", "is not of the form key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS[0].parent / "debug.yaml", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: [%s]\ntrain:\n  lr: -1\n" % (CONFIGS[0].parent / "debug.yaml"))
    with pytest.raises(ConfigError, match=f"{bad}: train.lr must be > 0"):
        load_config(bad)
    missing = tmp_path / "m.yaml"
    missing.write_text("defaults: [nowhere.yaml]\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_config(missing)
