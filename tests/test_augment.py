"""Augmentation (``data.augment``): image and masks move together, prompts follow the reader's
rules on the augmented masks, draws are a function of (seed, epoch, key), a resumed run augments
exactly as an uninterrupted one, and bad values fail naming the key."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import ROOT, SMALL_SIZE, TINY_MODEL

import pipeline.augment.batch as augment_batch
from configtree import ConfigError
from launch.local import free_port
from pipeline.augment import Augmenter, draw_params, sample_generator
from pipeline.augment.prompts import component_masks, mask_boxes
from pipeline.config import AugmentConfig, DataConfig
from pipeline.data.collate import collate
from pipeline.data.prompts import boxes_from_masks, component_boxes, points_from_masks
from pipeline.data.stream import build_train_loader
from pipeline.data.volume import VolumeSliceDataset, build_volume_loader
from pipeline.tasks.semantic import flatten_stacks
from samadapt.config import load_config
from sharding.config import ShardingConfig
from sharding.records import Volume
from sharding.volumes import finalize_volumes, store_path, write_case

S = 48
V = 64  # slice side of the volume store (the tiny model's input for the 3D run)
THRESHOLDS = (90, 140, 190)  # mask j = image > THRESHOLDS[j]
ALL = dict(
    hflip=0.5, vflip=0.5, rot90=0.5, rotate=0.7, rotate_deg=30, scale=0.7,
    scale_range=[0.7, 1.3], gamma=0.5, gamma_range=[0.6, 1.8], contrast=0.5,
    contrast_range=[0.7, 1.3],
)  # fmt: skip


# -- batches ----------------------------------------------------------------------------------


def _field(rng: np.random.Generator, size: int = S) -> np.ndarray:
    """A smooth uint8 image of a few bright blobs away from the border (so that no threshold
    mask touches the image edge, and none vanishes under the transforms of these tests)."""
    img = np.full((size, size), 30.0)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(3):
        cy, cx = rng.uniform(14, size - 14, 2)
        r = rng.uniform(4, 8)
        img += 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    return np.clip(img, 0, 255).astype(np.uint8)


def _threshold_batch(n: int, *, seed: int = 0, jitter: int = 0, epoch: int = 0) -> dict:
    """Collated interactive batch: masks are thresholds of the image, prompts by the reader."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        gray = _field(rng)
        masks = np.stack([(gray > t).astype(np.uint8) for t in THRESHOLDS])
        boxes = boxes_from_masks(masks, jitter=jitter, rng=rng)
        coords, labels = points_from_masks(masks, n=2, rng=rng)
        samples.append(
            {
                "key": f"synth/case{seed}/{i}",
                "image": np.broadcast_to(gray, (3, S, S)),
                "meta": {},
                "masks": masks,
                "boxes": boxes,
                "point_coords": coords,
                "point_labels": labels,
                "class_ids": np.arange(3),
            }
        )
    return {**collate(samples), "epoch": epoch}


def _augmenter(jitter: int = 0, box_from: str = "largest_component", **cfg) -> Augmenter:
    return Augmenter(
        AugmentConfig(**cfg), seed=3, box_from=box_from, box_jitter=jitter, device="cpu"
    )


def _band(masks: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood holds two values (the edge), beyond the image counting as
    background (what the resampling fills in)."""
    size = masks.shape[-1]
    m = F.pad(masks.float().reshape(-1, 1, size, size), (1, 1, 1, 1))
    hi = F.max_pool2d(m, 3, 1)
    lo = -F.max_pool2d(-m, 3, 1)
    return (hi != lo).view(masks.shape)


def _threshold(image: torch.Tensor) -> torch.Tensor:
    return torch.stack([image[:, 0] > t for t in THRESHOLDS], 1)


# -- alignment --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [dict(hflip=1.0), dict(vflip=1.0), dict(rot90=1.0), dict(rot_flip=1.0)],
    ids=["hflip", "vflip", "rot90", "rot_flip"],
)
def test_exact_transforms_keep_masks_equal_to_the_image_threshold(cfg):
    batch = _threshold_batch(6)
    out = _augmenter(**cfg).interactive(batch)
    assert not torch.equal(out["masks"], batch["masks"])
    assert torch.equal(out["masks"].bool(), _threshold(out["image"]))
    # the whole sample moved as one: its image is its own pixels, rearranged
    assert torch.equal(
        out["image"].flatten(1).sort(1).values, batch["image"].flatten(1).sort(1).values
    )
    # boxes and points moved with the masks: the reader's rule on the moved masks, exactly
    _check_prompts(out, jitter=0)
    for i in range(6):
        assert (out["boxes"][i].numpy() == component_boxes(out["masks"][i].numpy())).all()
    # a jittered box keeps its (moved) jitter
    jittered = _threshold_batch(6, jitter=5)
    _check_prompts(_augmenter(jitter=5, **cfg).interactive(jittered), jitter=5)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(rotate=1.0, rotate_deg=35),
        dict(scale=1.0, scale_range=[0.6, 0.8]),
        dict(scale=1.0, scale_range=[1.2, 1.5]),
        ALL,
    ],
    ids=["rotate", "zoom_in", "zoom_out", "all"],
)
def test_resampled_masks_match_the_image_threshold_up_to_the_edge(cfg):
    batch = _threshold_batch(6)
    out = _augmenter(**cfg).interactive(batch)
    moved = out["masks"].bool()
    assert not torch.equal(moved, batch["masks"].bool())
    if "gamma" in cfg:  # intensity changes move the threshold: compare geometry only
        plain = {k: v for k, v in cfg.items() if not k.startswith(("gamma", "contrast"))}
        out = _augmenter(**plain).interactive(batch)
        assert torch.equal(out["masks"].bool(), moved)
    disagree = moved ^ _threshold(out["image"])
    # bilinear image vs nearest masks: they may differ on edge pixels only, and on few of them
    band = _band(moved)
    assert not (disagree & ~band).any()
    assert disagree.sum() < 0.25 * band.sum()


def test_intensity_changes_the_image_only():
    batch = _threshold_batch(8)
    cfg = dict(gamma=1.0, gamma_range=[0.5, 2.0], contrast=1.0, contrast_range=[0.6, 1.4])
    out = _augmenter(**cfg).interactive(batch)
    for key in ("masks", "boxes", "point_coords", "point_labels"):
        assert torch.equal(out[key], batch[key]), key
    aug = AugmentConfig(**cfg)
    for i, key in enumerate(batch["keys"]):
        p = draw_params(aug, sample_generator(3, 0, key), masks=3, points=2)
        x = batch["image"][i].double().numpy()
        lo, span = x.min(), x.max() - x.min()
        x = lo + span * ((x - lo) / span) ** p.gamma
        x = np.clip(x.mean() + p.contrast * (x - x.mean()), 0, 255)
        assert np.abs(out["image"][i].double().numpy() - x).max() <= 0.5 + 1e-3


# -- prompts ----------------------------------------------------------------------------------


def _check_prompts(out: dict, *, jitter: int) -> None:
    for i in range(out["masks"].shape[0]):
        masks = out["masks"][i].numpy()
        exact = component_boxes(masks)
        boxes = out["boxes"][i].numpy().astype(np.int64)
        shift = boxes - exact
        assert (shift[:, 0] == shift[:, 2]).all() and (shift[:, 1] == shift[:, 3]).all()
        size = np.minimum(exact[:, 2] - exact[:, 0], exact[:, 3] - exact[:, 1])
        limit = np.minimum(jitter, (size * 0.1 * 5).astype(np.int64))
        assert (np.abs(shift[:, :2]) <= limit[:, None]).all(), (shift, limit)
        xy = out["point_coords"][i].long().numpy()
        rows = np.arange(masks.shape[0])[:, None]
        assert (masks[rows, xy[..., 1], xy[..., 0]] == 1).all()
        assert (out["point_labels"][i] == 1).all()


@pytest.mark.parametrize("device_components", [False, True], ids=["reader", "device"])
def test_prompts_follow_the_reader_rule_on_the_augmented_masks(device_components, monkeypatch):
    if device_components:  # the batched component search, as on a GPU
        monkeypatch.setattr(augment_batch, "HOST_COMPONENTS", ())
    batch = _threshold_batch(8)
    out = _augmenter(**ALL).interactive(batch)
    _check_prompts(out, jitter=0)
    # with jitter 0 the box is exactly the rule's
    for i in range(8):
        assert (out["boxes"][i].numpy() == component_boxes(out["masks"][i].numpy())).all()
    jittered = _augmenter(jitter=5, **ALL).interactive(_threshold_batch(8, jitter=5))
    _check_prompts(jittered, jitter=5)


def test_prompts_on_real_shards_with_the_preset_rules(small_shards):
    cfg = DataConfig(shards=str(small_shards), num_workers=0, batch_size=4, mask_num=5)
    loader = build_train_loader(cfg=cfg, image_size=SMALL_SIZE, rank=0, world_size=1)
    aug = Augmenter(
        AugmentConfig(rot_flip=0.5, rotate=1.0, rotate_deg=20, scale=0.5, scale_range=[0.8, 1.2]),
        seed=0,
        box_from="largest_component",
        box_jitter=cfg.box_jitter,
        device="cpu",
    )
    for n, batch in enumerate(loader):
        out = aug.interactive({**batch, "epoch": 0})
        assert out["mask_valid"].all() and (out["masks"].flatten(2).sum(2) > 0).all()
        for i in range(out["masks"].shape[0]):
            masks = out["masks"][i].numpy()
            shift = out["boxes"][i].numpy().astype(np.int64) - component_boxes(masks)
            assert (np.abs(shift) <= cfg.box_jitter).all()
            xy = out["point_coords"][i].long().numpy()
            assert (masks[np.arange(5)[:, None], xy[..., 1], xy[..., 0]] == 1).all()
        if n == 3:
            break


def test_whole_mask_boxes():
    out = _augmenter(box_from="whole_mask", rotate=1.0, rotate_deg=25).interactive(
        _threshold_batch(4)
    )
    for i in range(4):
        got = mask_boxes(out["masks"][i].bool())[0]
        assert torch.equal(out["boxes"][i].long(), got)


def _spiral(size: int) -> np.ndarray:
    img = np.zeros((size, size), np.uint8)
    t = np.linspace(1, size / 2 - 2, 400)
    pts = np.stack([size / 2 + t * np.cos(t / 3), size / 2 + t * np.sin(t / 3)], 1)
    cv2.polylines(img, [pts.astype(np.int32)], False, 1, 1)
    return img


def test_device_components_equal_the_reader_on_hard_shapes():
    rng = np.random.default_rng(1)
    masks = [
        (rng.random((S, S)) < 0.45).astype(np.uint8),  # hundreds of components, winding
        _spiral(S),
        np.zeros((S, S), np.uint8),  # empty
    ]
    ties = np.zeros((S, S), np.uint8)
    ties[30:33, 5:8] = ties[4:7, 40:43] = ties[20:23, 20:23] = 1  # equal sizes: raster order
    ring = np.zeros((S, S), np.uint8)
    cv2.circle(ring, (24, 24), 15, 1, 2)
    ring[22:27, 22:27] = 1  # a component inside another's hole
    masks += [ties, ring, ties[::-1].copy(), ties[:, ::-1].copy()]
    stack = np.stack(masks)
    got = mask_boxes(component_masks(torch.from_numpy(stack).bool()))[0].numpy()
    assert (got == component_boxes(stack)).all()


# -- vanishing masks and padding --------------------------------------------------------------


def test_a_sample_whose_mask_would_vanish_keeps_its_geometry():
    batch = _threshold_batch(3)
    corner = batch["masks"][0, 2].clone().zero_()
    corner[1:3, 1:3] = 1  # a speck in the corner: a zoom about the centre pushes it out
    batch["masks"][0, 2] = corner
    batch["boxes"][0, 2] = torch.tensor([1.0, 1.0, 3.0, 3.0])
    # sample 2 is padding after its first mask
    batch["mask_valid"][2, 1:] = False
    batch["masks"][2, 1:] = 0
    batch["boxes"][2, 1:] = 0
    batch["point_coords"][2, 1:] = 0
    batch["point_labels"][2, 1:] = -1
    out = _augmenter(scale=1.0, scale_range=[0.6, 0.6]).interactive(batch)
    for key in ("image", "masks", "boxes", "point_coords", "point_labels"):
        assert torch.equal(out[key][0], batch[key][0]), key  # left as it was
    assert not torch.equal(out["masks"][1], batch["masks"][1])  # the others zoomed
    assert torch.equal(out["mask_valid"], batch["mask_valid"])
    assert (out["boxes"][2, 1:] == 0).all() and (out["point_labels"][2, 1:] == -1).all()
    assert (out["masks"][2, 1:] == 0).all()


# -- seeding ----------------------------------------------------------------------------------


def test_draws_depend_on_seed_epoch_and_key_only():
    aug = _augmenter(**ALL)
    batch = _threshold_batch(6)
    first, again = aug.interactive(batch), aug.interactive(batch)
    for key in ("image", "masks", "boxes", "point_coords"):
        assert torch.equal(first[key], again[key])
    # the same samples in another order (another batch, rank or worker): the same output each
    order = [3, 0, 5, 1, 4, 2]
    shuffled = {k: v[order] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    shuffled.update(keys=[batch["keys"][i] for i in order], epoch=0)
    moved = aug.interactive(shuffled)
    for key in ("image", "masks", "boxes", "point_coords"):
        assert torch.equal(moved[key], first[key][order]), key
    # another epoch, or another key for the same pixels, draws otherwise
    later = aug.interactive({**batch, "epoch": 1})
    renamed = aug.interactive({**batch, "keys": [k + "x" for k in batch["keys"]]})
    for other in (later, renamed):
        assert not torch.equal(other["masks"], first["masks"])


def test_samed_rule_rotates_only_what_rot_flip_left_alone():
    cfg = load_config(ROOT / "configs/recipes/samed.yaml").data.augment
    draws = [draw_params(cfg, sample_generator(0, 0, f"k{i}")) for i in range(400)]
    # random_rot_flip always ends in a flip: a reflection (f in our canonical form)
    flipped = [d for d in draws if d.f]
    rotated = [d for d in draws if d.angle]
    assert not any(d.k for d in draws if not d.f)
    assert not any(d.angle for d in flipped)
    assert all(abs(d.angle) <= np.radians(20) for d in rotated)
    assert 0.4 < len(flipped) / 400 < 0.6 and 0.18 < len(rotated) / 400 < 0.32


# -- semantic: slice stacks -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack_store(tmp_path_factory) -> Path:
    """A store written by the sharder's volume writer: two MR cases whose labels are two
    thresholds of their images; case 'flat' repeats one slice in z."""
    out = tmp_path_factory.mktemp("augvol")
    rng = np.random.default_rng(5)
    vary = np.stack([_field(rng, V) for _ in range(5)])
    flat = np.repeat(_field(rng, V)[None], 5, axis=0)
    for name, image in (("vary", vary), ("flat", flat)):
        label = (image > 100).astype(np.uint8) + (image > 170)
        volume = Volume(
            image=image.astype(np.float32),
            label=label,
            spacing=(2.0, 1.0, 1.0),
            affine=np.eye(4),
            class_map={1: "a", 2: "b"},
            dataset="toy",
            case_id=name,
            modality="mr",
        )
        write_case(out, volume, split="train", cfg=ShardingConfig())
    finalize_volumes(out)
    return store_path(out, "toy")


def _thresholds(image: torch.Tensor, label: torch.Tensor) -> tuple[int, int]:
    """The two grey levels that separate the classes of a read batch (the reader maps the
    stored intensities monotonically, so the label stays a pair of thresholds of the image)."""
    t1, t2 = int(image[label == 0].max()), int(image[label <= 1].max())
    assert torch.equal((image > t1).long() + (image > t2).long(), label)
    return t1, t2


def _misaligned(image: torch.Tensor, label: torch.Tensor, t: tuple[int, int]) -> tuple[int, ...]:
    """(disagreements off the label's edges, disagreements, edge pixels)."""
    disagree = ((image > t[0]).long() + (image > t[1]).long()) != label
    band = _band(label)
    return int((disagree & ~band).sum()), int(disagree.sum()), int(band.sum())


def test_slice_stacks_move_together_with_their_labels(stack_store):
    dataset = VolumeSliceDataset(
        stack_store, cfg=DataConfig(), image_size=V, slices=3, split="train"
    )
    loader = build_volume_loader(dataset, rank=0, world_size=1, batch_size=4, shuffle=False)
    aug = _augmenter(**{**ALL, "gamma": 0.0, "contrast": 0.0})
    moved_any = False
    for batch in map(flatten_stacks, loader):
        assert len(batch["keys"]) * 3 == batch["image"].shape[0]
        t = _thresholds(batch["image"][:, 0], batch["label"])
        out = aug.semantic({**batch, "epoch": 2})
        moved_any |= not torch.equal(out["label"], batch["label"])
        off_edge, disagree, band = _misaligned(out["image"][:, 0], out["label"], t)
        assert off_edge == 0 and disagree < 0.25 * band
        for i, key in enumerate(batch["keys"]):
            stack = out["image"][3 * i : 3 * i + 3]
            if key.startswith("flat/"):  # identical slices stay identical: one transform
                assert torch.equal(stack[0], stack[1]) and torch.equal(stack[1], stack[2])
        again = aug.semantic({**batch, "epoch": 2})
        assert torch.equal(again["image"], out["image"]) and torch.equal(
            again["label"], out["label"]
        )
    assert moved_any


# -- resume with the real trainer -------------------------------------------------------------


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _worker(rank: int, port: int, shards: str, store: str, runs: str) -> None:
    import pipeline.tasks.interactive as interactive
    import pipeline.tasks.semantic as semantic
    from pipeline.distributed import DistEnv
    from pipeline.engine import init_distributed
    from pipeline.trainer import Trainer

    env = DistEnv(rank, rank, 1, 1, "127.0.0.1", port, "gloo")
    init_distributed(env)
    seen: list[tuple[str, str]] = []
    real_step, real_task_step = interactive.interactive_step, interactive.InteractiveTask.step

    fields = ("image", "masks", "boxes", "point_coords", "point_labels")

    def recording_step(engine, batch, **kwargs):  # what the step function is handed
        seen.append(("augmented", _digest(*(batch[k] for k in fields))))
        return real_step(engine, batch, **kwargs)

    def recording_task_step(self, batch, *, step):  # what the loader gave the task
        seen.append(("raw", _digest(*(batch[k] for k in fields))))
        return real_task_step(self, batch, step=step)

    interactive.interactive_step = recording_step
    interactive.InteractiveTask.step = recording_task_step
    results = {}
    for name, run, steps, resume in (
        ("straight", "a", 4, ""),
        ("first", "b", 2, ""),
        ("resumed", "b", 4, "auto"),
    ):
        cfg = load_config(
            ROOT / "configs/debug.yaml",
            [
                f"run_dir={Path(runs) / run}",
                f"data.shards={shards}",
                f"model.image_size={SMALL_SIZE}",
                "data.num_workers=0",
                "data.mask_num=2",
                "train.interaction_steps=2",
                f"train.steps={steps}",
                "train.log_every=1",
                "train.checkpoint_every=2",
                f"train.resume={resume}",
                "tracking.enabled=false",
                "data.augment.hflip=0.5",
                "data.augment.rot90=0.5",
                "data.augment.rotate=0.8",
                "data.augment.rotate_deg=20",
                "data.augment.scale=0.5",
                "data.augment.scale_range=[0.8,1.2]",
                "data.augment.gamma=0.5",
                "data.augment.gamma_range=[0.7,1.5]",
            ],
        )
        seen.clear()
        assert Trainer(cfg, env).train() == 0
        results[name] = list(seen)

    # prompt-free training on slice stacks from a Zarr store: the step gets augmented stacks
    # whose labels still match their images (the store's labels are thresholds of its images)
    real_semantic, real_semantic_task = semantic.semantic_step, semantic.SemanticTask.step
    levels: list[tuple[int, int]] = []

    def recording_semantic(engine, batch, **kwargs):
        image, label = batch["image"][:, 0], batch["label"]
        seen.append(("augmented", _digest(image, label), *_misaligned(image, label, levels[-1])))
        return real_semantic(engine, batch, **kwargs)

    def recording_semantic_task(self, batch, *, step):
        levels.append(_thresholds(batch["image"][:, 0], batch["label"]))
        seen.append(("raw", _digest(batch["image"][:, 0], batch["label"])))
        return real_semantic_task(self, batch, step=step)

    semantic.semantic_step = recording_semantic
    semantic.SemanticTask.step = recording_semantic_task
    cfg = load_config(
        ROOT / "configs/recipes/ma_sam.yaml",  # the authors' augmentation, on the tiny debug model
        [
            f"run_dir={Path(runs) / 'stacks'}",
            f"data.volumes={store}",
            f"model.image_size={V}",
            *TINY_MODEL,
            "model.slices=3",
            "model.fact_rank=8",
            "model.adapter3d_dim=16",
            "model.num_classes=2",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.augment.gamma=0",  # intensity moves the thresholds: geometry only here
            "data.augment.contrast=0",
            "data.augment.rotate=1.0",
            "train.steps=2",
            "train.warmup_steps=0",
            "train.checkpoint_every=0",
            "tracking.enabled=false",
        ],
    )
    seen.clear()
    assert Trainer(cfg, env).train() == 0
    results["stacks"] = list(seen)
    torch.save(results, Path(runs) / "seen.pt")


def test_trainer_augments_and_resumes_exactly(small_shards, stack_store, tmp_path):
    args = (free_port(), str(small_shards), str(stack_store), str(tmp_path))
    mp.spawn(_worker, args=args, nprocs=1, join=True)
    seen = torch.load(tmp_path / "seen.pt", weights_only=False)

    def kind(name, k):
        return [d for what, d in seen[name] if what == k]

    straight = kind("straight", "augmented")
    assert len(straight) == 4
    # augmentation happened: what the step function got is not what the loader gave
    assert any(a != r for a, r in zip(straight, kind("straight", "raw"), strict=True))
    assert kind("first", "augmented") == straight[:2]
    assert kind("resumed", "augmented") == straight[2:]
    assert kind("resumed", "raw") == kind("straight", "raw")[2:]
    # the slice-stack run: every step rotated (rotate=1), labels aligned up to their edges
    raw = [entry[1] for entry in seen["stacks"] if entry[0] == "raw"]
    stacks = [entry[1:] for entry in seen["stacks"] if entry[0] == "augmented"]
    assert len(stacks) == len(raw) == 2
    for (digest, outside_edge, disagree, band), before in zip(stacks, raw, strict=True):
        assert digest != before
        assert outside_edge == 0 and disagree < 0.25 * band


# -- config errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.augment.hflip=-0.5", "command line: data.augment.hflip must be in [0, 1], got -0.5"),
        ("data.augment.rot90=1.5", "data.augment.rot90 must be in [0, 1], got 1.5"),
        ("data.augment.flip=0.5", "command line: unknown key 'data.augment.flip'"),
        ("data.augment.rotate=0.5", "data.augment.rotate=0.5 needs rotate_deg > 0"),
        ("data.augment.rotate_deg=200", "data.augment.rotate_deg must be in [0, 180] degrees"),
        ("data.augment.scale_range=[1.2, 0.8]", "data.augment.scale_range must be [lo, hi]"),
        ("data.augment.scale_range=[0, 1]", "data.augment.scale_range must be [lo, hi]"),
        ("data.augment.gamma_range=[1.5]", "data.augment.gamma_range must be [lo, hi]"),
        ("data.augment.contrast_range=[-0.1, 1]", "data.augment.contrast_range must be [lo, hi]"),
        ("data.augment.gamma=yes", "data.augment.gamma must be a number"),
        ("data.augment=on", "data.augment must be a section"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/debug.yaml", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_error_names_the_preset_file(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text(
        f"defaults: [{ROOT / 'configs/recipes/samed.yaml'}]\ndata:\n  augment:\n    mirror: 0.5\n"
    )
    with pytest.raises(ConfigError, match=r"mine.yaml: unknown key 'data.augment.mirror'"):
        load_config(preset)


def test_presets_augment_as_their_authors():
    off = load_config(ROOT / "configs/recipes/sam_med2d.yaml").data.augment
    assert not off.enabled and not load_config(ROOT / "configs/debug.yaml").data.augment.enabled
    samed = load_config(ROOT / "configs/recipes/samed.yaml").data.augment
    assert (samed.rot_flip, samed.rotate, samed.rotate_deg) == (0.5, 0.5, 20.0)
    assert samed.rotate_exclusive
    ma_sam = load_config(ROOT / "configs/recipes/ma_sam.yaml").data.augment
    assert (ma_sam.rot_flip, ma_sam.rotate, ma_sam.rotate_deg) == (0.5, 0.5, 15.0)
    assert ma_sam.gamma_invert and ma_sam.gamma_range == [0.5, 3.5]
    autosam = load_config(ROOT / "configs/recipes/autosam.yaml").data.augment
    assert autosam.hflip == 0.5 and autosam.vflip == 0 and autosam.split_at_one
