"""``samadapt predict`` on real files: NIfTI (non-RAS stored, and with permuted axes), a DICOM
series written with pydicom, PNG/JPEG images; a real tiny export (the CLI's own ``samadapt
export`` of a seeded tiny model) for the command's outputs, and a predictor that draws exactly
its box prompt for where the prediction lands."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import yaml
from conftest import ROOT, SMALL_SIZE, TINY_MODEL

from configtree import to_dict
from pipeline.evaluate import fill_box
from pipeline.predict.inputs import list_inputs, settings
from pipeline.predict.prompts import load_prompts
from pipeline.predict.run import predict_inputs
from samadapt.cli import main
from samadapt.config import load_config
from sharding.readers.common import canonical_zyx
from sharding.readers.dicom import DicomReader
from sharding.synthetic import write_nifti
from sharding.synthetic_dicom import write_dicom
from sharding.synthetic_truth import synthetic_image

SHAPE = (5, 40, 48)  # (Z, Y, X) of the synthetic volumes


def _export(root: Path, *extra: str) -> tuple[str, str]:
    """A tiny model's config file and its export, made by the real ``samadapt export`` from the
    seeded base (as a run's export of a random-init model is)."""
    from pipeline.eval.models import base_model

    overrides = [*TINY_MODEL, f"model.image_size={SMALL_SIZE}", f"run_dir={root}", *extra]
    cfg = load_config(ROOT / "configs/debug.yaml", overrides)
    config = root / "config.yaml"
    root.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    torch.save(base_model(cfg).state_dict(), root / "state.pt")
    export = root / "export.pt"
    assert main(["export", str(config), str(root / "state.pt"), str(export)]) == 0
    return str(config), str(export)


@pytest.fixture(scope="module")
def promptable(tmp_path_factory) -> tuple[str, str]:
    return _export(tmp_path_factory.mktemp("sam") / "run")


@pytest.fixture(scope="module")
def semantic(tmp_path_factory) -> tuple[str, str]:
    return _export(
        tmp_path_factory.mktemp("linear") / "run",
        "model.head=linear",
        "model.num_classes=2",
        "train.mode=semantic",
    )


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    """The synthetic CT case stored flipped in x and y (LPS-like), the same data with permuted
    axes (k, i, j), their labels, and a DICOM series of another case."""
    root = tmp_path_factory.mktemp("scans")
    corpus = write_nifti(root / "nifti", n_cases=1, shape=SHAPE, modality="CT", seed=3)
    lps = corpus / "imagesTr" / "synth_000_0000.nii.gz"
    label = corpus / "labelsTr" / "synth_000.nii.gz"
    # new index (a, b, c) = old (i=b, j=c, k=a): slices along the old j axis
    perm = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    out = {"lps": lps, "lps_label": label}
    for name, path in (("perm", lps), ("perm_label", label)):
        img = nib.load(path)
        data = np.asanyarray(img.dataobj).transpose(2, 0, 1)
        out[name] = root / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, img.affine @ perm), out[name])
    out["dicom"] = write_dicom(root / "dicom", n_cases=1, shape=SHAPE, seed=4) / "case_000"
    return out


def _cli(*argv: str) -> int:
    return main(["predict", *argv, "--no-progress"])


def _write_json(path: Path, prompts: list[dict], **top) -> str:
    path.write_text(json.dumps({**top, "prompts": prompts}))
    return str(path)


def _bbox(mask: np.ndarray) -> list[int]:
    """[x0, y0, x1, y1] inclusive of a (rows, cols) mask: columns are x."""
    rows, cols = np.nonzero(mask)
    return [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]


def _fullest(truth: np.ndarray, pid: int) -> int:
    """The slice k of a stored (i, j, k) label with the most voxels of ``pid``."""
    return int((truth == pid).sum(axis=(0, 1)).argmax())


def _plane(volume_ijk: np.ndarray, k: int) -> np.ndarray:
    """Plane k of a stored (i, j, k) array as (rows = j, cols = i)."""
    return volume_ijk[:, :, k].T


def test_nifti_in_nifti_out_keeps_shape_affine_and_orientation(promptable, scans, tmp_path):
    config, export = promptable
    out = tmp_path / "out"
    prompts = []
    for name in ("lps", "perm"):
        truth = np.asanyarray(nib.load(scans[f"{name}_label"]).dataobj)
        for pid in (1, 2):
            k = _fullest(truth, pid)
            box = _bbox(_plane(truth, k) == pid)
            prompts.append({"input": scans[name].name, "id": pid, "slice": k, "box": box})
    prompts.append({"input": scans["perm"].name, "id": 3, "slice": 20, "points": [[2, 24, 1]]})
    pjson = _write_json(tmp_path / "p.json", prompts)
    code = _cli(
        config,
        export,
        str(scans["lps"]),
        str(scans["perm"]),
        "--out",
        str(out),
        "--prompts",
        pjson,
        "--overlays",
    )
    assert code == 0
    for name in ("lps", "perm"):
        src = nib.load(scans[name])
        pred = nib.load(out / scans[name].name)
        assert pred.shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
        assert nib.aff2axcodes(pred.affine) == nib.aff2axcodes(src.affine)
        assert int(pred.header["sform_code"]) == int(src.header["sform_code"])
        values = set(np.unique(np.asanyarray(pred.dataobj)).tolist())
        assert values <= {0, 1, 2, 3}
        assert pred.get_data_dtype() == np.uint8
    assert nib.aff2axcodes(nib.load(scans["lps"]).affine) == ("L", "P", "S")
    assert nib.aff2axcodes(nib.load(scans["perm"]).affine) == ("S", "L", "P")
    overlays = sorted(p.name for p in (out / "overlays").glob("*.png"))
    assert overlays and all(p.startswith(("synth_000_0000_k", "perm_k")) for p in overlays)


class FillBox:
    """A promptable model that predicts exactly its box prompt (``fill_box`` at the model's
    input, logits +-10): where its label lands is where the prompt was mapped to."""

    def __init__(self, cfg):
        self.cfg = cfg

    def encode(self, images: torch.Tensor, slices: int | None = None) -> torch.Tensor:
        assert images.shape[1:] == (3, self.cfg.image_size, self.cfg.image_size)
        return images[:, :1].float()

    def decode(self, embeddings, *, image_index, points=None, boxes=None, **_):
        mask = fill_box(boxes.float(), self.cfg.image_size)
        return torch.where(mask, 10.0, -10.0)[:, None], torch.ones(len(boxes), 1)


def _fill_box_run(config: str, items: list[str], prompts: list[dict], tmp_path: Path):
    cfg = load_config(config)
    inputs = list_inputs(items)
    specs = load_prompts(_write_json(tmp_path / "fb.json", prompts), inputs)
    rules = settings(cfg.sharding, "")
    return predict_inputs(
        FillBox(cfg.model), inputs, specs, rules=rules, out=tmp_path / "fb", progress=False
    )


def _box_mask(shape: tuple[int, int], box: list[int]) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[box[1] : box[3] + 1, box[0] : box[2] + 1] = True
    return m


def _check_lands(pred: np.ndarray, truth: np.ndarray, box: list[int]) -> None:
    """The prediction is the prompt's box within one pixel and holds the prompted object.

    One pixel: the box goes to the model's input as the shard writer's masks do (cv2's nearest
    neighbour, which samples floor(i * W / S), not the pixel centre), the logits come back by a
    centre-aligned bilinear resize (SAM's postprocess), so an edge may move by up to a pixel.
    """
    want = _box_mask(pred.shape, box)
    kernel = np.ones((3, 3), np.uint8)
    grown = cv2.dilate(want.astype(np.uint8), kernel).astype(bool)
    shrunk = cv2.erode(want.astype(np.uint8), kernel, borderValue=0).astype(bool)
    assert not (pred & ~grown).any() and not (shrunk & ~pred).any()
    assert (pred & truth).sum() / truth.sum() > 0.8


@pytest.mark.parametrize("name", ["lps", "perm"])
def test_prediction_lands_on_the_prompted_object_voxel_and_world(promptable, scans, tmp_path, name):
    config, _ = promptable
    src = nib.load(scans[name])
    truth = np.asanyarray(nib.load(scans[f"{name}_label"]).dataobj)
    k = _fullest(truth, 2)
    box = _bbox(_plane(truth, k) == 2)
    # the same box as two corners in RAS mm and in LPS mm (the voxel centres of its corners)
    corners = np.array([[box[0], box[1], k, 1.0], [box[2], box[3], k, 1.0]]) @ src.affine.T
    ras = corners[:, :3].tolist()
    lps = (corners[:, :3] * [-1, -1, 1]).tolist()
    for prompt in (
        {"slice": k, "box": box},
        {"space": "ras", "box": ras},
        {"space": "lps", "box": lps},
    ):
        result = _fill_box_run(config, [str(scans[name])], [{"id": 7, **prompt}], tmp_path)
        assert not result.failures, result.failures
        pred = np.asanyarray(nib.load(tmp_path / "fb" / scans[name].name).dataobj)
        assert set(np.unique(pred).tolist()) == {0, 7}
        assert not np.delete(pred, k, axis=2).any()  # only the prompted slice
        _check_lands(_plane(pred, k) == 7, _plane(truth, k) == 2, box)


def _dicom_slice_lps(case_dir: Path, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From the DICOM tags alone: slice k's ImagePositionPatient (in sorted order), and the LPS
    steps of one column and one row."""
    datasets = [pydicom.dcmread(p) for p in sorted(case_dir.iterdir()) if p.name != "label.nii.gz"]
    first = datasets[0]
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda ds: float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)))
    ipp = np.array([float(v) for v in datasets[k].ImagePositionPatient])
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    return ipp, iop[:3] * col_spacing, iop[3:] * row_spacing


def test_dicom_series_in_label_volume_aligned_with_the_series(promptable, scans, tmp_path):
    config, export = promptable
    case = scans["dicom"]
    truth_img = nib.load(case / "label.nii.gz")  # the writer's label, on the series' grid
    truth = np.asanyarray(truth_img.dataobj)
    k = _fullest(truth, 1)
    box = _bbox(_plane(truth, k) == 1)
    pjson = _write_json(tmp_path / "p.json", [{"slice": k, "box": box}])
    out = tmp_path / "out"
    assert _cli(config, export, str(case), "--out", str(out), "--prompts", pjson) == 0
    pred_img = nib.load(out / "case_000.nii.gz")
    assert pred_img.shape == truth.shape
    np.testing.assert_allclose(pred_img.affine, truth_img.affine, atol=1e-4)
    # and it is where the DICOM reader puts the series: reoriented as the reader reorients, the
    # same grid as the reader's volume
    reader = DicomReader(case.parent, cfg=load_config(config).sharding)
    volume = reader.load(reader.list_units()[0])
    zyx, affine, _ = canonical_zyx(np.asanyarray(pred_img.dataobj), pred_img.affine)
    assert zyx.shape == volume.image.shape
    np.testing.assert_allclose(affine, volume.affine, atol=1e-4)

    # the box prompted in voxels and in LPS mm from the slice's own tags lands on the object
    ipp, col_step, row_step = _dicom_slice_lps(case, k)
    lps = [
        (ipp + box[0] * col_step + box[1] * row_step).tolist(),
        (ipp + box[2] * col_step + box[3] * row_step).tolist(),
    ]
    for prompt in ({"slice": k, "box": box}, {"space": "lps", "box": lps}):
        result = _fill_box_run(config, [str(case)], [{"id": 1, **prompt}], tmp_path)
        assert not result.failures, result.failures
        pred = np.asanyarray(nib.load(tmp_path / "fb" / "case_000.nii.gz").dataobj)
        _check_lands(_plane(pred, k) == 1, _plane(truth, k) == 1, box)


def _png(path: Path, image: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), image)
    return path


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A non-square grey PNG (50 x 70) with one organ, and its mask."""
    image, masks, _ = synthetic_image(np.random.default_rng(5), 50, 70, 1)
    return _png(tmp_path_factory.mktemp("png") / "organ.png", image), masks[0]


def test_png_in_png_mask_of_the_original_size(promptable, picture, tmp_path):
    config, export = promptable
    path, mask = picture
    colour = _png(tmp_path / "colour.jpg", np.dstack([cv2.imread(str(path), 0)] * 3))
    pjson = _write_json(
        tmp_path / "p.json",
        [{"id": 3, "box": _bbox(mask)}, {"id": 300, "input": "colour.jpg", "points": [[5, 5, 1]]}],
    )
    out = tmp_path / "out"
    code = _cli(config, export, str(path), str(colour), "--out", str(out), "--prompts", pjson)
    assert code == 0
    organ = cv2.imread(str(out / "organ.png"), cv2.IMREAD_UNCHANGED)
    assert organ.shape == (50, 70) and organ.dtype == np.uint8
    assert set(np.unique(organ).tolist()) <= {0, 3}
    both = cv2.imread(str(out / "colour.png"), cv2.IMREAD_UNCHANGED)
    assert both.shape == (50, 70) and both.dtype == np.uint16  # id 300 does not fit uint8
    assert set(np.unique(both).tolist()) <= {0, 3, 300}


@pytest.mark.parametrize("resize", ["square", "letterbox"])
def test_png_prediction_lands_on_the_prompted_object(promptable, picture, tmp_path, resize):
    config, _ = promptable
    path, mask = picture
    box = _bbox(mask)
    cfg = load_config(config, [f"sharding.resize={resize}"])
    inputs = list_inputs([str(path)])
    specs = load_prompts(_write_json(tmp_path / "p.json", [{"box": box}]), inputs)
    rules = settings(cfg.sharding, "")
    result = predict_inputs(
        FillBox(cfg.model), inputs, specs, rules=rules, out=tmp_path, progress=False
    )
    assert not result.failures
    pred = cv2.imread(str(tmp_path / "organ.png"), cv2.IMREAD_UNCHANGED)
    _check_lands(pred == 1, mask, box)


def test_prompt_free_head_labels_every_slice_with_its_classes(semantic, scans, tmp_path, capsys):
    config, export = semantic
    out = tmp_path / "out"
    assert _cli(config, export, str(scans["lps"]), "--out", str(out), "--batch-size", "2") == 0
    src, pred = nib.load(scans["lps"]), nib.load(out / scans["lps"].name)
    assert pred.shape == src.shape
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
    assert set(np.unique(np.asanyarray(pred.dataobj)).tolist()) <= {0, 1, 2}
    argv = [config, export, str(scans["lps"]), "--out", str(tmp_path / "two"), "--classes", "2"]
    assert _cli(*argv) == 0
    two = np.asanyarray(nib.load(tmp_path / "two" / scans["lps"].name).dataobj)
    full = np.asanyarray(pred.dataobj)
    np.testing.assert_array_equal(two, np.where(full == 2, 2, 0))
    capsys.readouterr()
    # a class id outside the head, prompts for a prompt-free head: one line each, naming them
    assert _cli(*argv[:-1], "3") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("samadapt predict: --classes: class 3 is outside the head") and (
        "\n" not in err
    )
    pjson = _write_json(tmp_path / "p.json", [{"slice": 0, "box": [1, 1, 4, 4]}])
    assert _cli(config, export, str(scans["lps"]), "--out", str(out), "--prompts", pjson) == 2
    assert "--prompts: model.head=linear is prompt-free" in capsys.readouterr().err


class Bright:
    """A prompt-free model with ``model.slices = 3`` that calls class 1 every bright image."""

    def __init__(self, cfg):
        self.cfg = cfg

    def semantic(self, images: torch.Tensor, slices: int) -> torch.Tensor:
        assert slices == 3 and images.shape[0] % 3 == 0
        fg = images[:, :1].float() - 127.5
        return torch.cat([torch.zeros_like(fg), fg], 1)


def test_slice_stacks_take_each_slice_from_the_centre_of_its_stack(promptable, tmp_path):
    config, _ = promptable
    cfg = load_config(config, ["model.head=linear", "model.slices=3", "train.mode=semantic"])
    data = np.zeros((9, 7, 6), dtype=np.float32)
    data[:, :, 1::2] = 1000.0  # odd slices bright
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.8, 2.0, 1.0])), tmp_path / "stripes.nii.gz")
    inputs = list_inputs([str(tmp_path / "stripes.nii.gz")])
    rules = settings(cfg.sharding, "", modality="mr")
    out = tmp_path / "out"
    result = predict_inputs(
        Bright(cfg.model), inputs, [], rules=rules, out=out, batch_size=4, progress=False
    )
    assert not result.failures
    label = np.asanyarray(nib.load(out / "stripes.nii.gz").dataobj)
    assert [int(label[:, :, k].max()) for k in range(6)] == [0, 1, 0, 1, 0, 1]
    assert label.min(axis=(0, 1)).tolist() == label.max(axis=(0, 1)).tolist()


def test_bad_inputs_give_one_line_each_and_the_others_are_written(
    promptable, picture, tmp_path, capsys
):
    config, export = promptable
    good, _ = picture
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((30, 20), dtype=np.float32), np.eye(4)), flat)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    small = _png(tmp_path / "small.png", np.full((12, 16), 90, np.uint8))
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    missing = tmp_path / "nowhere.png"
    prompts = [
        {"box": [2, 2, 10, 10]},
        {"input": "small.png", "box": [0, 0, 40, 5]},  # wider than the 16-pixel image
    ]
    pjson = _write_json(tmp_path / "p.json", prompts)
    out = tmp_path / "out"
    inputs = [str(p) for p in (good, flat, broken, small, notes, missing)]
    capsys.readouterr()
    code = _cli(config, export, *inputs, "--out", str(out), "--prompts", pjson)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1
    assert (out / "organ.png").is_file() and not (out / "small.png").exists()
    failures = [line for line in err if line.startswith("samadapt predict: ")]
    assert failures[-1] == "samadapt predict: 5 of 6 inputs failed (listed above)"
    expected = {
        flat: "expected a 3D (or 4D multi-channel) image, got shape (30, 20)",
        broken: "unreadable image NIfTI",
        small: "prompts[1]: box corner (40.0, 5.0) is outside",
        notes: "not an input samadapt predict reads",
        missing: "no such file or folder",
    }
    for path, text in expected.items():
        (line,) = [line for line in failures[:-1] if str(path) in line]
        assert text in line, line
    summary = json.loads((out / "predict.json").read_text())
    assert [w["input"] for w in summary["written"]] == [str(good)]
    assert len(summary["failures"]) == 5


def _one_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = _cli(*argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("samadapt predict:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_model_or_prompts_file_give_one_line(promptable, picture, tmp_path, capsys):
    config, export = promptable
    good = str(picture[0])
    ok = _write_json(tmp_path / "ok.json", [{"box": [1, 1, 9, 9]}])
    out = ["--out", str(tmp_path / "out"), "--prompts", ok]
    # an export of another model than the config's
    err = _one_line(capsys, [config, export, good, "model.prompt_dim=64", *out])
    assert export in err and "model.prompt_dim" in err
    err = _one_line(capsys, [config, str(tmp_path / "none.pt"), good, *out])
    assert str(tmp_path / "none.pt") in err
    out = out[:2]
    bad_key = _write_json(tmp_path / "k.json", [{"bx": [1, 1, 2, 2]}])
    err = _one_line(capsys, [config, export, good, *out, "--prompts", bad_key])
    assert "k.json: prompts[0]: unknown key 'bx'" in err
    other = _write_json(tmp_path / "o.json", [{"input": "x.png", "box": [1, 1, 2, 2]}])
    err = _one_line(capsys, [config, export, good, *out, "--prompts", other])
    assert "prompts[0].input: 'x.png' is none of the inputs" in err
    err = _one_line(capsys, [config, export, good, *out])
    assert "model.head=sam is promptable" in err


def test_intensity_and_resize_rules_come_from_the_training_shards(volumes, tmp_path):
    """The shards' manifest (settings they were written with) and summary (their modality)
    decide how inputs are mapped; the config's sharding section only when there are none."""
    shards = str(volumes.parent.parent)
    cfg = load_config(
        ROOT / "configs/debug.yaml", ["sharding.ct_window=[0,100]", "sharding.resize=letterbox"]
    ).sharding
    rules = settings(cfg, shards)
    assert rules.sharding.ct_window == [40.0, 400.0] and rules.sharding.resize == "square"
    assert (rules.modality, rules.fallback) == ("", "ct")
    assert settings(cfg, shards, modality="MRI").modality == "mr"
    alone = settings(cfg, str(tmp_path / "none"))
    assert alone.sharding.ct_window == [0, 100] and alone.sharding.resize == "letterbox"
    assert (alone.modality, alone.fallback) == ("", "")
