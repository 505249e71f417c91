"""The corpus readers on real files written by sharding.synthetic (and broken copies of them)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest

from sharding import synthetic
from sharding.config import ShardingConfig
from sharding.intensity import percentile_to_uint8
from sharding.readers import FORMATS, get_reader
from sharding.readers.sa_med2d import mask_class_name, parse_image_stem
from sharding.records import RejectedInput, Slice2D, Volume
from sharding.synthetic import (
    ORGANS_2D,
    VOLUME_LABELS,
    synthetic_image,
    synthetic_volume,
    volume_affine,
)

CFG = ShardingConfig()
SHAPE = (6, 40, 48)


def _expected_2d(seed: int, n_images: int, size: tuple[int, int], masks_per_image):
    """Replays the generator's random stream: what each image and mask must be."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_images):
        n = int(rng.integers(masks_per_image[0], masks_per_image[1] + 1))
        out.append(synthetic_image(rng, size[0], size[1], n))
    return out


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------------------- get_reader


def test_get_reader_errors_name_the_format_and_path(tmp_path):
    assert FORMATS == ("sa-med2d", "nifti", "dicom", "folder")
    with pytest.raises(ValueError, match=r"unknown input format 'png'.*sa-med2d, nifti"):
        get_reader("png", tmp_path, cfg=CFG)
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        get_reader("nifti", missing, cfg=CFG)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty}: input folder is empty"):
        get_reader("folder", empty, cfg=CFG)
    (empty / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="dataset.json not found"):
        get_reader("nifti", empty, cfg=CFG)
    with pytest.raises(ValueError, match="images"):
        get_reader("folder", empty, cfg=CFG).list_units()


# ------------------------------------------------------------------------------- SA-Med2D


@pytest.fixture(scope="module")
def sa16m(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sa") / "sa16m"
    return synthetic.write_sa_med2d(root, n_cases=3, slices_per_case=2, size=64, seed=3)


def test_sa_med2d_16m_units_and_pixels(sa16m):
    reader = get_reader("sa-med2d", sa16m, cfg=CFG)
    units = reader.list_units()
    assert [u.id for u in units] == sorted(u.id for u in units) and len(units) == 6
    assert units[0].id == "images/ct_00--SynthAbdomen--case_0000--z_0010.png"
    # sorted by id, so the CT cases (prefix ct_) come before the MR case
    assert [u.case_id for u in units] == ["case_0000"] * 2 + ["case_0002"] * 2 + ["case_0001"] * 2
    assert [u.modality for u in units] == ["ct"] * 4 + ["mr"] * 2
    assert {u.dataset for u in units} == {"SynthAbdomen"}
    mapping = json.loads((sa16m / "image2label_train.json").read_text())
    used = sorted(
        {Path(m).stem.split("--")[-1].rsplit("_", 1)[0] for v in mapping.values() for m in v}
    )
    assert reader.class_ids == {name: i + 1 for i, name in enumerate(used)}
    # the generator wrote the images in (case, slice) order
    expected = _expected_2d(3, 6, (64, 64), (2, 5))
    for unit in units:
        case, number = int(unit.case_id[-4:]), int(unit.id[-8:-4])
        image, masks, names = expected[2 * case + (number - 10) // 3]
        got = reader.load(unit)
        assert isinstance(got, Slice2D)
        np.testing.assert_array_equal(got.image, image)
        # masks come in mask-file order: sort the truth the same way
        files = [f"{n}_{sum(1 for m in names[:i] if m == n):03d}" for i, n in enumerate(names)]
        order = np.argsort(files, kind="stable")
        np.testing.assert_array_equal(got.masks, masks[order])
        assert got.class_names == [names[i] for i in order]
        assert got.class_ids == [reader.class_ids[names[i]] for i in order]
        assert got.slice_index in (10, 13) and got.rejections == []
        assert got.modality == unit.modality and got.case_id == unit.case_id


def test_sa_med2d_demo_style_parent_relative_json(tmp_path):
    root = synthetic.write_sa_med2d(
        tmp_path / "data_demo", n_cases=2, slices_per_case=2, size=32, style="demo"
    )
    key = next(iter(json.loads((root / "image2label_train.json").read_text())))
    assert key.startswith("data_demo/images/")
    reader = get_reader("sa-med2d", root, cfg=ShardingConfig(modality="CT"))
    units = reader.list_units()
    assert [u.id for u in units] == [
        "images/synth_0000_10.png",
        "images/synth_0000_13.png",
        "images/synth_0001_10.png",
        "images/synth_0001_13.png",
    ]
    assert [u.case_id for u in units] == ["synth_0000"] * 2 + ["synth_0001"] * 2
    assert {u.dataset for u in units} == {"data_demo"} and {u.modality for u in units} == {"ct"}
    expected = _expected_2d(0, 4, (32, 32), (2, 5))
    for unit, (image, _, names) in zip(units, expected, strict=True):
        got = reader.load(unit)
        np.testing.assert_array_equal(got.image, image)
        assert sorted(got.class_names) == sorted(names)
        assert got.slice_index == int(unit.id.split("_")[-1][:-4])
    # without any image2label_*.json the masks are matched by name
    (root / "image2label_train.json").unlink()
    scanned = get_reader("sa-med2d", root, cfg=CFG)
    assert [u.paths for u in scanned.list_units()] == [u.paths for u in units]
    assert scanned.list_units()[0].modality == "unknown"


def test_sa_med2d_parsing_rules():
    assert parse_image_stem("ct_00--AbdomenCT1K--Case_00001--x_0089", "root") == (
        "AbdomenCT1K",
        "Case_00001",
        "ct",
        89,
    )
    assert parse_image_stem("amos_0004_75", "data_demo") == ("data_demo", "amos_0004", "", 75)
    assert parse_image_stem("mr_brain_3", "d") == ("d", "mr_brain", "mr", 3)
    assert parse_image_stem("scan", "d") == ("d", "scan", "", -1)
    assert mask_class_name("amos_0004_75_aorta_000", "amos_0004_75") == "aorta"
    assert mask_class_name("a--b--c--x_1--left_kidney_002", "a--b--c--x_1") == "left_kidney"
    assert mask_class_name("amos_0004_75_000", "amos_0004_75") == ""


def test_sa_med2d_16bit_png_uses_percentiles(tmp_path):
    root = synthetic.write_sa_med2d(tmp_path / "c", n_cases=1, slices_per_case=1, size=32)
    image_path = next((root / "images").glob("*.png"))
    deep = (np.random.default_rng(0).random((32, 32)) * 60000).astype(np.uint16)
    cv2.imwrite(str(image_path), deep)
    cfg = ShardingConfig(mr_percentiles=[1.0, 99.0])
    reader = get_reader("sa-med2d", root, cfg=cfg)
    got = reader.load(reader.list_units()[0])
    lo, hi = np.percentile(deep.astype(np.float64), [1.0, 99.0])
    ref = np.floor((np.clip(deep, lo, hi) - lo) * 255.0 / (hi - lo) + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(got.image, ref)
    np.testing.assert_array_equal(got.image, percentile_to_uint8(deep, percentiles=(1, 99)))
    # colour PNGs (BGR on disk) load as RGB; a reader sent to another process loads alone
    colour = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    cv2.imwrite(str(image_path), colour)
    fresh = pickle.loads(pickle.dumps(get_reader("sa-med2d", root, cfg=cfg)))
    got = fresh.load(reader.list_units()[0])
    np.testing.assert_array_equal(got.image, colour[:, :, ::-1])
    assert got.masks.shape[0] >= 2 and got.rejections == []


def test_sa_med2d_bad_masks_are_left_out_and_listed(sa16m, tmp_path):
    root = shutil.copytree(sa16m, tmp_path / "sa16m")
    reader = get_reader("sa-med2d", root, cfg=CFG)
    unit = next(u for u in reader.list_units() if len(u.paths) >= 5)  # >= 4 masks
    image_path, masks = Path(unit.paths[0]), [Path(p) for p in unit.paths[1:]]
    masks[0].unlink()
    cv2.imwrite(str(masks[1]), np.full((10, 10), 255, np.uint8))
    cv2.imwrite(str(masks[2]), np.zeros((64, 64), np.uint8))
    masks[3].write_bytes(b"garbage")
    got = reader.load(unit)
    reasons = {r["path"]: r["reason"] for r in got.rejections}
    assert len(reasons) == 4
    assert "does not exist" in reasons[str(masks[0])]
    assert "mask size 10x10 != image size 64x64" in reasons[str(masks[1])]
    assert "empty" in reasons[str(masks[2])]
    assert "not a PNG" in reasons[str(masks[3])]
    assert {r["unit"] for r in got.rejections} == {unit.id}
    assert got.masks.shape[0] == len(masks) - 4 == len(got.class_ids) == len(got.class_names)
    expected = [mask_class_name(p.stem, image_path.stem) for p in masks[4:]]
    assert got.class_names == expected
    # a truncated image rejects the unit, naming the file
    _cut(image_path)
    with pytest.raises(RejectedInput) as err:
        reader.load(unit)
    assert err.value.path == str(image_path) and "truncated" in err.value.reason
    # garbage in a .png
    other = reader.list_units()[1]
    Path(other.paths[0]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50 + b"IEND\xaeB`\x82")
    with pytest.raises(RejectedInput, match="not a decodable image"):
        reader.load(other)


def test_sa_med2d_masks_after_a_rejected_one_and_colour_masks(sa16m, tmp_path):
    root = shutil.copytree(sa16m, tmp_path / "sa16m")
    reader = get_reader("sa-med2d", root, cfg=CFG)
    unit = next(u for u in reader.list_units() if len(u.paths) >= 4)  # >= 3 masks
    masks = [Path(p) for p in unit.paths[1:]]
    truth = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) > 0 for p in masks]
    assert all(t.any() for t in truth)
    cv2.imwrite(str(masks[0]), np.zeros((64, 64), np.uint8))  # empty: rejected, slot reused
    colour = np.zeros((64, 64, 3), np.uint8)
    colour[..., 1] = truth[1] * 200  # inside only in one channel
    cv2.imwrite(str(masks[1]), colour)
    got = reader.load(unit)
    assert [r["path"] for r in got.rejections] == [str(masks[0])]
    assert got.masks.dtype == bool and got.masks.shape == (len(masks) - 1, 64, 64)
    for mask, ref in zip(got.masks, truth[1:], strict=True):
        np.testing.assert_array_equal(mask, ref)


def test_sa_med2d_json_naming_missing_image(sa16m, tmp_path):
    root = shutil.copytree(sa16m, tmp_path / "sa16m")
    path = root / "image2label_train.json"
    mapping = json.loads(path.read_text())
    mapping["images/ct_00--SynthAbdomen--case_0099--z_0001.png"] = []
    path.write_text(json.dumps(mapping))
    reader = get_reader("sa-med2d", root, cfg=CFG)
    unit = next(u for u in reader.list_units() if u.case_id == "case_0099")
    with pytest.raises(RejectedInput) as err:
        reader.load(unit)
    assert err.value.path.endswith("case_0099--z_0001.png")
    assert "named in image2label_train.json does not exist" in err.value.reason


# ------------------------------------------------------------------------------- folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fo") / "plain"
    return synthetic.write_folder(root, n_cases=2, slices_per_case=3, size=(40, 56), seed=5)


def test_folder_units_and_label_maps(folder):
    reader = get_reader("folder", folder, cfg=CFG)
    units = reader.list_units()
    assert [u.id for u in units] == [
        f"images/patient{c}_{s:03d}.png" for c in (0, 1) for s in range(3)
    ]
    assert [u.case_id for u in units] == ["patient0"] * 3 + ["patient1"] * 3
    expected = _expected_2d(5, 6, (40, 56), (1, 3))
    for unit, (image, masks, names) in zip(units, expected, strict=True):
        got = reader.load(unit)
        np.testing.assert_array_equal(got.image, image)
        labels = np.zeros((40, 56), np.uint8)
        for m, n in zip(masks, names, strict=True):
            labels[m] = ORGANS_2D.index(n) + 1
        ids = [int(v) for v in np.unique(labels) if v]
        assert got.class_ids == ids
        assert got.class_names == [ORGANS_2D[i - 1] for i in ids]
        np.testing.assert_array_equal(got.masks, labels[None] == np.array(ids)[:, None, None])
        assert got.slice_index == int(unit.id[-7:-4]) and got.dataset == "plain"


def test_folder_bad_inputs(folder, tmp_path):
    root = shutil.copytree(folder, tmp_path / "plain")
    table = json.loads((root / "classes.json").read_text())
    reader = get_reader("folder", root, cfg=CFG)
    units = reader.list_units()
    first = reader.load(units[0])
    drop = first.class_ids[0]
    del table[str(drop)]
    (root / "classes.json").write_text(json.dumps(table))
    reader = get_reader("folder", root, cfg=CFG)
    got = reader.load(units[0])
    assert drop not in got.class_ids
    assert got.rejections == [
        {
            "unit": units[0].id,
            "path": units[0].paths[1],
            "reason": f"label value {drop} is not in classes.json",
        }
    ]
    (root / "classes.json").unlink()
    named = get_reader("folder", root, cfg=CFG).load(units[0])
    assert named.class_names == [f"class_{i}" for i in first.class_ids]
    Path(units[1].paths[1]).unlink()
    with pytest.raises(RejectedInput, match="mask file does not exist"):
        reader.load(units[1])
    cv2.imwrite(units[2].paths[1], np.zeros((40, 55), np.uint8))
    with pytest.raises(RejectedInput, match="mask size 55x40 != image size 56x40"):
        reader.load(units[2])
    jpg = root / "images" / "patient1_000.jpg"
    cv2.imwrite(str(jpg), np.zeros((40, 56), np.uint8))
    Path(units[3].paths[0]).unlink()
    _cut(jpg, 0.9)
    with pytest.raises(RejectedInput) as err:
        reader.load(next(u for u in reader.list_units() if u.id.endswith(".jpg")))
    assert err.value.path == str(jpg) and "truncated JPEG" in err.value.reason


# ------------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("layout,modality", [("nnunet", "CT"), ("msd", "MRI")])
def test_nifti_loads_canonical_truth(tmp_path, layout, modality):
    root = synthetic.write_nifti(
        tmp_path / "Dataset001_Synth", n_cases=2, shape=SHAPE, modality=modality, layout=layout
    )
    reader = get_reader("nifti", root, cfg=CFG)
    units = reader.list_units()
    assert [u.id for u in units] == ["synth_000", "synth_001"]
    assert [u.case_id for u in units] == ["synth_000", "synth_001"]
    name = "Dataset001_Synth" if layout == "nnunet" else "SynthMSD"
    assert {u.dataset for u in units} == {name}
    for i, unit in enumerate(units):
        vol = reader.load(unit)
        assert isinstance(vol, Volume)
        image, label = synthetic_volume(i, SHAPE, modality)
        assert vol.image.dtype == np.float32 and vol.image.shape == SHAPE
        np.testing.assert_array_equal(vol.image, image)
        np.testing.assert_array_equal(vol.label, label)
        np.testing.assert_allclose(vol.affine, volume_affine(i, SHAPE), atol=1e-5)
        np.testing.assert_allclose(vol.spacing, (2.5, 0.8, 0.75), rtol=1e-6)
        assert vol.class_map == VOLUME_LABELS
        assert vol.modality == ("ct" if modality == "CT" else "mr")
    overridden = get_reader("nifti", root, cfg=ShardingConfig(dataset="X", modality="pet"))
    assert overridden.list_units()[0].dataset == "X"
    assert overridden.load(units[0]).modality == "pet"


def test_nifti_flipped_affine_loads_to_the_same_array(tmp_path):
    root = synthetic.write_nifti(tmp_path / "d", n_cases=1, shape=SHAPE)
    reader = get_reader("nifti", root, cfg=CFG)
    unit = reader.list_units()[0]
    before = reader.load(unit)
    for path in (Path(p) for p in unit.paths):
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        # canonical storage: flip X and Y back, with the matching affine
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[0, 3], flip[1, 3] = data.shape[0] - 1, data.shape[1] - 1
        nib.save(nib.Nifti1Image(data[::-1, ::-1, :].copy(), img.affine @ flip), str(path))
        assert nib.aff2axcodes(nib.load(str(path)).affine) == ("R", "A", "S")
    after = reader.load(unit)
    np.testing.assert_array_equal(after.image, before.image)
    np.testing.assert_array_equal(after.label, before.label)
    np.testing.assert_allclose(after.affine, before.affine, atol=1e-5)
    # axes swapped too (stored as (Z, X, Y) with a permuted affine): still the same
    for path in (Path(p) for p in unit.paths):
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj).transpose(2, 0, 1)
        perm = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
        nib.save(nib.Nifti1Image(data.copy(), img.affine @ perm), str(path))
    swapped = reader.load(unit)
    np.testing.assert_array_equal(swapped.image, before.image)
    np.testing.assert_array_equal(swapped.label, before.label)


def test_nifti_bad_inputs(tmp_path):
    root = synthetic.write_nifti(tmp_path / "d", n_cases=5, shape=SHAPE)
    reader = get_reader("nifti", root, cfg=CFG)
    units = reader.list_units()
    img_path = lambda i: Path(units[i].paths[0])  # noqa: E731
    lab_path = lambda i: Path(units[i].paths[1])  # noqa: E731
    _cut(img_path(0))
    with pytest.raises(RejectedInput) as err:
        reader.load(units[0])
    assert err.value.path == str(img_path(0))
    # NaN in the image
    img = nib.load(str(img_path(1)))
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[3, 4, 2] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(img_path(1)))
    with pytest.raises(RejectedInput, match="1 NaN/Inf voxels"):
        reader.load(units[1])
    # label of another shape
    lab = nib.load(str(lab_path(2)))
    nib.save(nib.Nifti1Image(np.asanyarray(lab.dataobj)[:-1], lab.affine), str(lab_path(2)))
    with pytest.raises(RejectedInput, match="label shape") as err:
        reader.load(units[2])
    assert err.value.path == str(lab_path(2))
    # unknown label ids
    lab = nib.load(str(lab_path(3)))
    data = np.asanyarray(lab.dataobj).copy()
    data[0, 0, 0], data[1, 1, 1] = 7, 9
    nib.save(nib.Nifti1Image(data, lab.affine), str(lab_path(3)))
    with pytest.raises(RejectedInput, match=r"label ids \[7, 9\] are not in dataset.json"):
        reader.load(units[3])
    # label on a shifted grid
    lab = nib.load(str(lab_path(4)))
    shifted = lab.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asanyarray(lab.dataobj), shifted), str(lab_path(4)))
    with pytest.raises(RejectedInput, match="affine differs"):
        reader.load(units[4])
    # a missing label file while labelsTr/ exists
    lab_path(4).unlink()
    with pytest.raises(RejectedInput, match="label file does not exist"):
        reader.load(units[4])
    # no labelsTr/ at all: an unlabelled corpus
    shutil.rmtree(root / "labelsTr")
    unlabelled = get_reader("nifti", root, cfg=CFG)
    assert unlabelled.load(unlabelled.list_units()[4]).label is None


# ------------------------------------------------------------------------------- DICOM


@pytest.fixture(scope="module")
def dicom_root(tmp_path_factory) -> Path:
    return synthetic.write_dicom(tmp_path_factory.mktemp("dc") / "ct", n_cases=2, shape=SHAPE)


def test_dicom_sorted_rescaled_canonical(dicom_root):
    reader = get_reader("dicom", dicom_root, cfg=CFG)
    units = reader.list_units()
    assert [u.id for u in units] == ["case_000", "case_001"]
    assert Path(units[1].paths[0]).suffix == "" and Path(units[0].paths[0]).suffix == ".dcm"
    # files are named in shuffled order: the name order is not the slice order
    first = pydicom.dcmread(units[0].paths[0])
    zs = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in units[0].paths[:-1]]
    assert zs != sorted(zs) and float(first.RescaleIntercept) == -1024.0
    assert float(pydicom.dcmread(units[1].paths[0]).RescaleSlope) == 2.0
    for i, unit in enumerate(units):
        vol = reader.load(unit)
        image, label = synthetic_volume(i, SHAPE, "CT", quantum=2)
        np.testing.assert_array_equal(vol.image, image)  # HU after slope/intercept
        np.testing.assert_array_equal(vol.label, label)
        np.testing.assert_allclose(vol.affine, volume_affine(i, SHAPE), atol=1e-4)
        np.testing.assert_allclose(vol.spacing, (2.5, 0.8, 0.75))
        assert vol.modality == "ct" and vol.case_id == unit.id and vol.dataset == "ct"
        assert vol.class_map == VOLUME_LABELS and vol.rejections == []


def test_dicom_seg_labels(tmp_path):
    root = synthetic.write_dicom(tmp_path / "seg", n_cases=1, shape=SHAPE, label="seg")
    reader = get_reader("dicom", root, cfg=CFG)
    unit = reader.list_units()[0]
    assert unit.paths[-1].endswith("seg.dcm")
    vol = reader.load(unit)
    image, label = synthetic_volume(0, SHAPE, "CT", quantum=2)
    np.testing.assert_array_equal(vol.image, image)
    np.testing.assert_array_equal(vol.label, label)
    assert vol.class_map == VOLUME_LABELS


def test_dicom_bad_inputs(dicom_root, tmp_path):
    root = shutil.copytree(dicom_root, tmp_path / "ct")
    reader = get_reader("dicom", root, cfg=CFG)
    units = reader.list_units()
    slices = [Path(p) for p in units[0].paths if not p.endswith(".nii.gz")]
    _cut(slices[2], 0.6)
    with pytest.raises(RejectedInput) as err:
        reader.load(units[0])
    assert err.value.path == str(slices[2])
    slices[2].write_bytes(b"not a dicom file at all")
    with pytest.raises(RejectedInput, match="unreadable DICOM") as err:
        reader.load(units[0])
    assert err.value.path == str(slices[2])
    # a slice missing in the middle of case 1
    files = [Path(p) for p in units[1].paths if not p.endswith(".nii.gz")]
    by_z = sorted(files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    by_z[3].unlink()
    unit1 = get_reader("dicom", root, cfg=CFG).list_units()[1]
    with pytest.raises(RejectedInput, match="slice missing between") as err:
        reader.load(unit1)
    assert err.value.path == str(root / "case_001")
    # a file listed, then gone
    with pytest.raises(RejectedInput, match="file does not exist"):
        reader.load(units[1])


def test_dicom_second_series_is_ignored_and_listed(dicom_root, tmp_path):
    root = shutil.copytree(dicom_root, tmp_path / "ct")
    stray = root / "case_000" / "extra" / "IMX.dcm"
    stray.parent.mkdir()
    shutil.copy(next((root / "case_001").glob("IM*")), stray)
    reader = get_reader("dicom", root, cfg=CFG)
    unit = reader.list_units()[0]
    assert str(stray) in unit.paths
    vol = reader.load(unit)
    np.testing.assert_array_equal(vol.image, synthetic_volume(0, SHAPE, "CT", quantum=2)[0])
    assert len(vol.rejections) == 1 and vol.rejections[0]["path"] == str(stray)
    assert "other series" in vol.rejections[0]["reason"]


def test_dicom_label_grid_mismatch(dicom_root, tmp_path):
    root = shutil.copytree(dicom_root, tmp_path / "ct")
    reader = get_reader("dicom", root, cfg=CFG)
    unit = reader.list_units()[0]
    path = Path(unit.paths[-1])
    lab = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asanyarray(lab.dataobj)[:, :-2], lab.affine), str(path))
    with pytest.raises(RejectedInput, match="label shape") as err:
        reader.load(unit)
    assert err.value.path == str(path)


# ------------------------------------------------------------------------------- CLI


def test_synthetic_cli_writes_a_readable_corpus(tmp_path):
    from samadapt.synthetic import main

    out = tmp_path / "quick"
    assert main(["--format", "sa-med2d", str(out), "--cases", "2", "--size", "32"]) == 0
    units = get_reader("sa-med2d", out, cfg=CFG).list_units()
    assert len(units) == 2 * 4
    before = sorted(p.name for p in (out / "images").iterdir())
    assert main(["--format", "sa-med2d", str(out), "--cases", "1"]) == 0  # kept
    assert sorted(p.name for p in (out / "images").iterdir()) == before


def test_dicom_real_pydicom_test_files(tmp_path):
    """Real scanner files shipped with pydicom: a CT slice, and a truncated MR file."""
    from pydicom.data import get_testdata_file

    ct = Path(get_testdata_file("CT_small.dcm"))
    (tmp_path / "ct_case").mkdir()
    shutil.copy(ct, tmp_path / "ct_case" / "slice.dcm")
    (tmp_path / "mr_case").mkdir()
    shutil.copy(get_testdata_file("MR_truncated.dcm"), tmp_path / "mr_case" / "MR1")
    reader = get_reader("dicom", tmp_path, cfg=CFG)
    units = reader.list_units()
    assert [u.id for u in units] == ["ct_case", "mr_case"]
    vol = reader.load(units[0])
    ds = pydicom.dcmread(ct)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    # axial LPS rows/columns become canonical RAS: both in-plane axes flip
    np.testing.assert_array_equal(vol.image[0], hu[::-1, ::-1])
    assert vol.image.shape == (1, 128, 128) and vol.modality == "ct" and vol.label is None
    np.testing.assert_allclose(vol.spacing[1:], (0.661468, 0.661468))
    corner = vol.affine @ np.array([0, 127, 127, 1.0])  # the stored first pixel, in RAS
    ipp = [float(v) for v in ds.ImagePositionPatient]
    np.testing.assert_allclose(corner[:3], [-ipp[0], -ipp[1], ipp[2]], atol=1e-4)
    with pytest.raises(RejectedInput) as err:
        reader.load(units[1])
    assert err.value.path == str(tmp_path / "mr_case" / "MR1")


# ------------------------------------------------------------------------------- shapes


def _box_dice(mask: np.ndarray) -> float:
    """Dice of the filled tight bounding box against the mask (computed here, not by the
    generator's own helper)."""
    ys, xs = np.nonzero(mask)
    box = np.zeros_like(mask, dtype=bool)
    box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    return 2.0 * np.logical_and(box, mask).sum() / (box.sum() + mask.sum())


def test_synthetic_shapes_need_a_model(tmp_path):
    """Filling the prompt box must not already segment the synthetic organs (mean Dice < 0.7;
    ~0.9 on the discs and ellipses of earlier versions), in 2D and in volume slices; the masks
    are real shapes (not empty, not a few pixels), in weak contrast to their surroundings."""
    root = synthetic.write_sa_med2d(tmp_path / "sa", n_cases=6, slices_per_case=4, size=128)
    reader = get_reader("sa-med2d", root, cfg=CFG)
    dice, contrast = [], []
    for unit in reader.list_units():
        item = reader.load(unit)
        image = item.image.astype(np.float64)
        for mask in item.masks:
            ys, xs = np.nonzero(mask)
            assert mask.sum() >= 0.002 * mask.size, "a mask of a few pixels"
            assert np.ptp(ys) >= 4 and np.ptp(xs) >= 4
            dice.append(_box_dice(mask))
            ring = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
            ring &= ~mask
            contrast.append(abs(image[mask].mean() - image[ring].mean()))
    assert len(dice) >= 50
    assert np.mean(dice) < 0.7, np.mean(dice)
    # an organ differs from its surroundings by a few noise sd, not by a hard step
    assert 4.0 < np.median(contrast) < 30.0, np.median(contrast)
    vdice = []
    for case in range(3):
        _, label = synthetic_volume(case, (8, 64, 64), "CT")
        assert set(np.unique(label)) == {0, 1, 2, 3}
        for k in range(label.shape[0]):
            assert label[k].any(), "every slice holds an organ"
            vdice += [_box_dice(label[k] == i) for i in (1, 2, 3) if (label[k] == i).any()]
    assert np.mean(vdice) < 0.7, np.mean(vdice)
    # generation is deterministic per seed
    again = synthetic.write_sa_med2d(tmp_path / "sa2", n_cases=6, slices_per_case=4, size=128)
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert all((root / f).read_bytes() == (again / f).read_bytes() for f in files)
