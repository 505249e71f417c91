"""The config tree: presets load, overrides apply, and bad values fail naming key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from configtree import ConfigError, dump_config, flatten, to_dict
from samadapt.config import from_dict, load_config
from sharding.files import atomic_write_text

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# The presets and profiles in configs/, and the paper recipes in configs/recipes/.
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml")) + sorted(CONFIG_DIR.glob("recipes/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_preset_loads(path):
    cfg = load_config(path)
    # the input size and the stack depth are set once, in the model section
    assert "image_size" not in to_dict(cfg)["data"] and "slices" not in to_dict(cfg)["data"]
    assert cfg.model.image_size % 16 == 0 and cfg.model.slices % 2 == 1


def test_presets_derive_not_copy():
    derived = load_config(CONFIG_DIR / "recipes/msa.yaml")
    assert derived.model.peft == ["msa_adapter"]
    assert derived.train.log_every == 50 and derived.train.mode == "interactive"  # sam_med2d.yaml
    assert derived.train.interaction_steps == 1  # its own value over sam_med2d.yaml's 9


def test_overrides_and_yaml_values():
    cfg = load_config(
        CONFIG_DIR / "debug.yaml",
        ["train.lr=3e-3", "model.peft=[lora, fact]", "train.steps=7", "tracking.uri="],
    )
    assert cfg.train.lr == 0.003 and cfg.model.peft == ["lora", "fact"] and cfg.train.steps == 7
    assert cfg.tracking.uri == ""


def test_round_trip(tmp_path):
    cfg = load_config(CONFIG_DIR / "debug.yaml")
    atomic_write_text(tmp_path / "c.yaml", dump_config(cfg))
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
        ("data.image_size=512", "command line: unknown key 'data.image_size'"),
        ("data.slices=3", "command line: unknown key 'data.slices'"),
        ("train.loss.name=dice", "train.loss.name is an unknown interactive loss 'dice'; known:"),
        ("train.loss.name=ce_dice", "'ce_dice' (a loss for prompt-free heads)"),
        ("train.loss.reduction=mean", "train.loss.reduction must be one of mask, batch; got"),
        ("train.loss.focal_weight=1", "train.loss.focal_weight is an unknown option of loss 'bce"),
        ("train.loss.iou_target=frozen", "train.loss.iou_target must be one of detached, live"),
        ("train.loss.pos_weight=0", "train.loss.pos_weight"),
        ("train.focal_weight=20", "command line: unknown key 'train.focal_weight'"),
        ("train", "is not of the form key=value"),
        ("eval.prompts=[foo]", "command line: eval.prompts unknown prompt kind 'foo'"),
        ("eval.prompts=[]", "eval.prompts must name at least one prompt kind"),
        ("eval.prompts=[box, box]", "eval.prompts lists a kind twice"),
        ("eval.clicks=0", "command line: eval.clicks must be >= 1, got 0"),
        ("eval.max_samples=-1", "command line: eval.max_samples must be >= 0 (0 = the whole"),
        ("eval.overlays=-3", "command line: eval.overlays must be >= 0"),
        ("launch.cpus_per_task=0", "command line: launch.cpus_per_task must be >= 1, got 0"),
        ("launch.gpus_per_node=-1", "command line: launch.gpus_per_node must be >= 0"),
        ("launch.mem_gb=-5", "command line: launch.mem_gb must be >= 0"),
        ("model.slices=2", "command line: model.slices must be odd and >= 1, got 2"),
        ("model.slices=0", "command line: model.slices must be >= 1"),
        ("model.adapter_init=ones", "command line: model.adapter_init must be one of"),
        ("data.box_from=box", "command line: data.box_from must be one of"),
        ("model.pixel_norm=imagenet", "command line: model.pixel_norm must be one of"),
        ("model.multimask=maybe", "command line: model.multimask must be"),
        ("train.loss_resolution=half", "command line: train.loss_resolution must be one of"),
        ("train.decay_steps=-1", "command line: train.decay_steps must be >= 0"),
        ("train.semantic_dice_smooth=-1", "command line: train.semantic_dice_smooth must be >= 0"),
        ("train.loss.dice_weight=-1", "command line: train.loss.dice_weight must be >= 0"),
        (
            ("train.loss.bce_weight=0", "train.loss.dice_weight=0", "train.loss.iou_weight=0"),
            "command line: train.loss.bce_weight all term weights (bce_weight, dice_weight, iou",
        ),
        ("model.head_decode=pairwise", "command line: model.head_decode must be one of"),
        ("model.class_token_init=zeros", "command line: model.class_token_init must be one of"),
        (
            "model.encoder_input_size=1000",
            "command line: model.encoder_input_size must be 0 (= image_size) or a multiple of 16",
        ),
        # options of the prompt-free heads, on debug.yaml's promptable head
        ("model.head_decode=per_class", "model.head_decode=per_class is an option of head=auto"),
        (
            "model.class_token_init=random",
            "model.class_token_init=random is an option of head=auto",
        ),
        (
            "model.encoder_input_size=1024",
            "model.encoder_input_size is an option of the prompt-free heads (auto, cnn, linear)",
        ),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        overrides = [override] if isinstance(override, str) else list(override)
        load_config(CONFIG_DIR / "debug.yaml", overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: [%s]\ntrain:\n  lr: -1\n" % (CONFIG_DIR / "debug.yaml"))
    with pytest.raises(ConfigError, match=f"{bad}: train.lr must be > 0"):
        load_config(bad)
    missing = tmp_path / "m.yaml"
    missing.write_text("defaults: [nowhere.yaml]\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_config(missing)


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "eval.max_samples=0",
            "eval.overlays=0",
            "eval.prompts=[point]",
            "eval.clicks=3",
            "data.point_num=3",
        ],
        ["eval.prompts=[box]", "eval.clicks=3"],  # no point prompt: clicks unused
        ["launch.mem_gb=0", "launch.gpus_per_node=0", "launch.cpus_per_task=1"],
        [
            "model.slices=3",
            "data.volumes=v.zarr",
            "model.head=auto",
            "train.mode=semantic",
        ],
        ["model.head=cnn", "train.mode=semantic"],
        # MSA's and SAMed's switches
        [
            "model.multimask=false",
            "model.train_prompt_encoder=false",
            "train.interaction_steps=1",
            "train.first_prompt_box_prob=0",
            "train.loss_resolution=low_res",
            "train.loss.bce_weight=1",
            "train.loss.dice_weight=0",
            "train.loss.iou_weight=0",
            "train.loss.pos_weight=2",
        ],
        [
            "model.head=auto",
            "train.mode=semantic",
            "train.loss_resolution=low_res",
            "model.pixel_norm=unit",
            "train.decay_steps=100",
        ],
    ],
    ids=["eval", "eval-box", "launch", "stack", "semantic", "msa", "samed"],
)
def test_edge_values_load(overrides):
    """The values that mean "all" / "none" / "default" stay valid."""
    load_config(CONFIG_DIR / "debug.yaml", overrides)


# Combinations the trainer used to catch only when it started (pipeline.trainer.check_config).
COMBINATIONS = [
    (
        ["model.head=auto"],
        "command line: model.head=auto is prompt-free: it needs train.mode=semantic",
    ),
    (
        ["train.mode=semantic"],
        "command line: train.mode=semantic needs a prompt-free head: model.head=auto|cnn|linear",
    ),
    (
        ["eval.clicks=3", "data.point_num=2"],
        "command line: eval.clicks=3 needs data.point_num >= 3",
    ),
    (
        ["train.grad_accum=2"],
        "command line: train.grad_accum=2: each interaction step is its own optimizer step",
    ),
    (
        ["data.volumes=v.zarr"],
        "command line: data.volumes (3D slice stacks) feeds prompt-free training",
    ),
    (
        ["model.head=cnn", "train.mode=semantic", "train.loss_resolution=low_res"],
        "command line: train.loss_resolution=low_res is the S/4 grid of SAM's decoder (model.head"
        "=sam, or auto without progressive_upsampling), but model.head=cnn predicts at the input",
    ),
    (
        [
            "model.head=auto",
            "model.progressive_upsampling=true",
            "train.mode=semantic",
            "train.loss_resolution=low_res",
        ],
        "but model.head=auto with progressive_upsampling predicts at the input size",
    ),
]
COMBINATION_IDS = ["head", "mode", "clicks", "accum", "volumes", "low-res-cnn", "low-res-up"]


@pytest.mark.parametrize("overrides, message", COMBINATIONS, ids=COMBINATION_IDS)
def test_impossible_combinations_fail_at_load(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG_DIR / "debug.yaml", overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("command", ["model-info", "export"])
@pytest.mark.parametrize("overrides, message", COMBINATIONS, ids=COMBINATION_IDS)
def test_commands_that_never_train_reject_combinations(
    tmp_path, capsys, command, overrides, message
):
    from samadapt.cli import main

    config = str(CONFIG_DIR / "debug.yaml")
    args = [config, *overrides]
    if command == "export":
        args = [config, str(tmp_path / "state.pt"), str(tmp_path / "out.pt"), *overrides]
    assert main([command, *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_combination_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: [%s]\nmodel:\n  head: linear\n" % (CONFIG_DIR / "debug.yaml"))
    with pytest.raises(ConfigError, match=f"^{bad}: model.head=linear is prompt-free"):
        load_config(bad)
    bad.write_text("eval:\n  clicks: 0\n")
    with pytest.raises(ConfigError, match=f"^{bad}: eval.clicks must be >= 1"):
        load_config(bad)


def test_sharding_config_errors_through_samadapt_shard(tmp_path, capsys):
    """The sharding section is sharding's; its errors still end `samadapt shard` with one line."""
    from samadapt.cli import main

    corpus = tmp_path / "in"
    corpus.mkdir()
    args = ["--format", "nifti", str(corpus), str(tmp_path / "out"), "--config"]
    args += [str(CONFIG_DIR / "debug.yaml"), "sharding.val_fraction=1.5"]
    assert main(["shard", *args]) == 2
    err = capsys.readouterr().err
    assert (
        "samadapt shard: config error: command line: sharding.val_fraction must be in [0, 1], "
        "got 1.5" in err
    )
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_sections_build_on_their_own():
    """Each package's section builds with configtree alone and names its full key."""
    from configtree import from_dict as build_section
    from launch.config import LaunchConfig
    from pipeline.model.config import ModelConfig
    from sharding.config import ShardingConfig

    assert build_section(ShardingConfig, {"image_size": 64}).image_size == 64
    with pytest.raises(ConfigError, match=r"^defaults: launch\.ranks must be >= 1$"):
        build_section(LaunchConfig, {"ranks": 0}, prefix="launch.")
    with pytest.raises(ConfigError, match=r"unknown key 'model\.nope'"):
        build_section(ModelConfig, {"nope": 1}, prefix="model.")


def test_prompt_and_init_rules_checked_without_the_loader():
    """Built in code (not from YAML), the sections still refuse a bad value, naming the key."""
    from configtree import FieldError
    from pipeline.config import DataConfig, TrainConfig
    from pipeline.model.config import ModelConfig

    assert DataConfig().box_from == "largest_component" and ModelConfig().adapter_init == "authors"
    cases = [
        (DataConfig, "box_from", "whole", "must be one of largest_component, whole_mask"),
        (ModelConfig, "adapter_init", "ones", "must be one of authors, zero"),
        (ModelConfig, "pixel_norm", "imagenet", "must be one of sam, unit"),
        (TrainConfig, "loss_resolution", "half", "must be one of input, low_res"),
        (ModelConfig, "head_decode", "pairwise", "must be one of joint, per_class"),
        (ModelConfig, "class_token_init", "zeros", "must be one of sam, random"),
    ]
    for section, key, value, message in cases:
        with pytest.raises(FieldError, match=f"^{message}, got '{value}'$") as err:
            section(**{key: value})
        assert err.value.key == key


def test_saved_run_config_holds_every_section(tmp_path):
    """config.yaml keeps the sharding and launch sections; the library's part rebuilds alone."""
    import yaml

    from configtree import from_dict as build_section
    from pipeline.config import PipelineConfig

    cfg = load_config(CONFIG_DIR / "debug.yaml", ["launch.ranks=2", "model.slices=3"])
    atomic_write_text(tmp_path / "config.yaml", dump_config(cfg))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    sections = {"sharding", "data", "model", "train", "eval", "launch", "tracking"}
    assert set(saved) == {"run_dir", "seed", *sections} and saved["launch"]["ranks"] == 2
    mine = {k: v for k, v in saved.items() if k not in ("sharding", "launch")}
    assert to_dict(build_section(PipelineConfig, mine)) == mine
    with pytest.raises(ConfigError, match="unknown key 'sharding'"):
        build_section(PipelineConfig, saved)
