"""sharding.intensity and sharding.transform: pixel-exact against the documented rules."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

import sharding.intensity as intensity
from sharding.config import ShardingConfig
from sharding.intensity import percentile_to_uint8, to_uint8, window_to_uint8
from sharding.records import Volume
from sharding.transform import resize_sample, target_shape, volume_slices


def _reference(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The module docstring's formula, element by element in Python floats."""
    out = np.zeros(values.shape, dtype=np.uint8)
    for idx, v in np.ndenumerate(values.astype(np.float64)):
        if np.isnan(v):
            continue
        out[idx] = int(np.floor((min(max(v, lo), hi) - lo) * 255.0 / (hi - lo) + 0.5))
    return out


# ------------------------------------------------------------------------------- intensity


def test_ct_window_known_values():
    cfg = ShardingConfig(ct_window=[40.0, 400.0])
    hu = np.array([-3000, -1000, -160, -159.9, 40, 239, 240, 3000, np.nan], dtype=np.float32)
    got = to_uint8(hu, modality="CT", cfg=cfg)
    # lo = -160, hi = 240; 40 HU -> 127.5 -> floor(128.0) = 128
    assert got.dtype == np.uint8
    assert got.tolist() == [0, 0, 0, 0, 128, 254, 255, 255, 0]


def test_ct_window_matches_reference_on_random_volume():
    rng = np.random.default_rng(0)
    cfg = ShardingConfig(ct_window=[50.0, 350.0])
    vol = rng.normal(0, 300, size=(3, 17, 19)).astype(np.float32)
    got = to_uint8(vol, modality="ct", cfg=cfg)
    assert got.shape == vol.shape
    np.testing.assert_array_equal(got, _reference(vol, 50 - 175, 50 + 175))
    # CT is windowed even when the input is uint8
    u8 = rng.integers(0, 256, size=(5, 5), dtype=np.uint8)
    np.testing.assert_array_equal(
        to_uint8(u8, modality="Ct", cfg=cfg), _reference(u8, -125.0, 225.0)
    )


def test_percentiles_match_reference_and_ignore_nan():
    rng = np.random.default_rng(1)
    cfg = ShardingConfig(mr_percentiles=[2.0, 98.0])
    img = rng.gamma(2.0, 300.0, size=(2, 30, 40)).astype(np.float32)
    lo, hi = np.percentile(img.astype(np.float64), [2.0, 98.0])
    got = to_uint8(img, modality="mr", cfg=cfg)
    np.testing.assert_array_equal(got, _reference(img, lo, hi))
    with_nan = img.copy()
    with_nan[0, :3, :3] = np.nan
    lo2, hi2 = np.percentile(with_nan[~np.isnan(with_nan)].astype(np.float64), [2.0, 98.0])
    got2 = to_uint8(with_nan, modality="MR", cfg=cfg)
    np.testing.assert_array_equal(got2, _reference(with_nan, lo2, hi2))
    assert (got2[0, :3, :3] == 0).all()


def test_uint8_non_ct_is_returned_as_is_and_degenerate_inputs():
    cfg = ShardingConfig()
    u8 = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert to_uint8(u8, modality="mr", cfg=cfg) is u8
    assert to_uint8(u8, modality="unknown", cfg=cfg) is u8
    assert (to_uint8(np.full((4, 4), 7.0), modality="pet", cfg=cfg) == 0).all()
    assert (to_uint8(np.full((4, 4), np.nan), modality="mr", cfg=cfg) == 0).all()
    u16 = np.array([[0, 1000], [2000, 65535]], dtype=np.uint16)
    got = percentile_to_uint8(u16, percentiles=(0.0, 100.0))
    np.testing.assert_array_equal(got, _reference(u16, 0.0, 65535.0))


def test_linear_rule_rounds_halves_up():
    raw = np.array([200, 40, -160, 240, -2000, 3000, np.nan], np.float32)
    # (200 + 160) * 255 / 400 = 229.5 exactly: rounds to 230 (the 3D reader maps slices with it)
    assert intensity.linear_uint8(raw, -160.0, 240.0).tolist() == [230, 128, 0, 255, 0, 255, 0]
    assert intensity.linear_uint8(raw, 5.0, 5.0).tolist() == [0] * 7


def test_intensity_record_gives_back_the_bounds_of_to_uint8():
    """What a volume's attrs store, read back, maps a slice exactly as ``to_uint8`` mapped the
    whole volume for the 2D shards."""
    rng = np.random.default_rng(3)
    cfg = ShardingConfig(ct_window=[40.0, 400.0], mr_percentiles=[1.0, 99.0])
    for modality, vol in (
        ("ct", rng.integers(-1000, 1500, size=(3, 8, 9)).astype(np.float32)),
        ("mr", rng.gamma(2.0, 300.0, size=(3, 8, 9)).astype(np.float32)),
    ):
        record = intensity.intensity_record(vol, modality=modality, cfg=cfg)
        lo, hi = intensity.record_bounds(record)
        np.testing.assert_array_equal(
            intensity.linear_uint8(vol[1], lo, hi), to_uint8(vol, modality=modality, cfg=cfg)[1]
        )
    assert record["mapping"] == "percentiles" and record["percentiles"] == [1.0, 99.0]
    ct = intensity.intensity_record(vol, modality="CT", cfg=cfg)
    assert ct == {"mapping": "ct_window", "level": 40.0, "width": 400.0}
    assert intensity.record_bounds(ct) == (-160.0, 240.0)
    with pytest.raises(ValueError, match="unknown mapping 'gamma'"):
        intensity.record_bounds({"mapping": "gamma"})
    with pytest.raises(ValueError, match="window width must be > 0"):
        intensity.record_bounds({"mapping": "ct_window", "level": 40, "width": 0})


def test_chunked_conversion_equals_one_pass(monkeypatch):
    rng = np.random.default_rng(2)
    vol = rng.normal(0, 500, size=(4, 33, 31)).astype(np.float32)
    whole = window_to_uint8(vol, level=40, width=400)
    monkeypatch.setattr(intensity, "_CHUNK", 100)
    np.testing.assert_array_equal(window_to_uint8(vol, level=40, width=400), whole)


# ------------------------------------------------------------------------------- resize


def _masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    return rng.random((n, h, w)) < 0.3


@pytest.mark.parametrize(
    "shape,interp", [((300, 200), cv2.INTER_AREA), ((40, 50), cv2.INTER_LINEAR)]
)
def test_square_resize_is_cv2_pixel_exact(shape, interp):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    masks = _masks(rng, 3, *shape)
    out_img, out_masks = resize_sample(image, masks, size=64, mode="square")
    np.testing.assert_array_equal(out_img, cv2.resize(image, (64, 64), interpolation=interp))
    assert out_masks.dtype == bool and out_masks.shape == (3, 64, 64)
    for i in range(3):
        ref = cv2.resize(masks[i].astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(out_masks[i], ref.astype(bool))


def test_many_masks_are_each_resized_alone():
    # 600 masks: more than cv2's 512-channel limit, so no multi-channel trick could hide here
    rng = np.random.default_rng(4)
    masks = _masks(rng, 600, 37, 29)
    image = np.zeros((37, 29), dtype=np.uint8)
    _, out = resize_sample(image, masks, size=16, mode="square")
    assert out.shape == (600, 16, 16) and out.dtype == bool
    for i in range(600):
        ref = cv2.resize(masks[i].astype(np.uint8), (16, 16), interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(out[i], ref.astype(bool))
    # a strided (non-contiguous) stack and 0/255 bytes give the same masks
    strided = np.ascontiguousarray(masks.transpose(0, 2, 1)).transpose(0, 2, 1)
    np.testing.assert_array_equal(resize_sample(image, strided, size=16, mode="square")[1], out)
    as_bytes = masks.astype(np.uint8) * 255
    np.testing.assert_array_equal(resize_sample(image, as_bytes, size=16, mode="square")[1], out)


def test_letterbox_keeps_aspect_and_pads_bottom_right():
    rng = np.random.default_rng(5)
    image = rng.integers(1, 256, size=(100, 250, 3), dtype=np.uint8)
    masks = np.ones((2, 100, 250), dtype=bool)
    assert target_shape(100, 250, size=64, mode="letterbox") == (26, 64)  # 25.6 -> 26
    out_img, out_masks = resize_sample(image, masks, size=64, mode="letterbox")
    assert out_img.shape == (64, 64, 3) and out_masks.shape == (2, 64, 64)
    ref = cv2.resize(image, (64, 26), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(out_img[:26], ref)
    assert (out_img[26:] == 0).all()
    assert out_masks[:, :26].all() and not out_masks[:, 26:].any()
    # tall image, enlarged: pad on the right
    tall = rng.integers(1, 256, size=(20, 10), dtype=np.uint8)
    out_tall, none = resize_sample(tall, np.zeros((0, 20, 10), bool), size=32, mode="letterbox")
    np.testing.assert_array_equal(
        out_tall[:, :16], cv2.resize(tall, (16, 32), interpolation=cv2.INTER_LINEAR)
    )
    assert (out_tall[:, 16:] == 0).all() and none.shape == (0, 32, 32)


def test_resize_rejects_bad_shapes_and_modes():
    image = np.zeros((10, 12), dtype=np.uint8)
    with pytest.raises(ValueError, match="masks must be"):
        resize_sample(image, np.zeros((1, 12, 10), bool), size=16, mode="square")
    with pytest.raises(ValueError, match="unknown resize mode 'crop'"):
        resize_sample(image, np.zeros((1, 10, 12), bool), size=16, mode="crop")


# ------------------------------------------------------------------------------- volumes


def test_volume_slices_masks_per_label_and_empty_slices():
    rng = np.random.default_rng(6)
    image = rng.normal(0, 200, size=(4, 20, 24)).astype(np.float32)
    label = np.zeros((4, 20, 24), dtype=np.uint8)
    label[1, 2:8, 3:9] = 1
    label[1, 10:15, 10:20] = 3
    label[2, 5:6, 5:6] = 7  # an id the class map does not name
    vol = Volume(
        image=image,
        label=label,
        spacing=(2.5, 0.8, 0.7),
        affine=np.eye(4),
        class_map={1: "liver", 3: "spleen"},
        dataset="d",
        case_id="c",
        modality="CT",
        source="src",
    )
    cfg = ShardingConfig()
    slices = list(volume_slices(vol, cfg=cfg))
    assert [s.slice_index for s in slices] == [0, 1, 2, 3]
    expected8 = to_uint8(image, modality="ct", cfg=cfg)
    for z, s in enumerate(slices):
        np.testing.assert_array_equal(s.image, expected8[z])
        assert s.image.dtype == np.uint8 and s.masks.dtype == bool
        assert s.spacing == (0.8, 0.7) and (s.dataset, s.case_id) == ("d", "c")
    assert slices[0].masks.shape == (0, 20, 24) and slices[0].class_ids == []
    assert slices[1].class_ids == [1, 3] and slices[1].class_names == ["liver", "spleen"]
    np.testing.assert_array_equal(slices[1].masks[1], label[1] == 3)
    assert slices[2].class_names == ["label_7"]
    # MR: one percentile pair for the whole volume, not per slice
    mr = Volume(
        image=image,
        label=None,
        spacing=(1, 1, 1),
        affine=np.eye(4),
        class_map={},
        dataset="d",
        case_id="c",
        modality="mr",
    )
    whole = to_uint8(image, modality="mr", cfg=cfg)
    for z, s in enumerate(volume_slices(mr, cfg=cfg)):
        np.testing.assert_array_equal(s.image, whole[z])
        assert s.masks.shape == (0, 20, 24)
