"""The interaction plan and the on-device prompt builders, checked pixel by pixel."""

from __future__ import annotations

import ast
import collections
import inspect
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from pipeline import interact, losses
from pipeline.interact import (
    SAM_MED2D_CLICKS,
    mask_prompt,
    plan_interaction,
    sample_clicks,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# plan_interaction
# ---------------------------------------------------------------------------------------------


def test_plan_follows_sam_med2d_schedule_over_many_seeds():
    n_plans = 3000
    first = collections.Counter()
    random_step = collections.Counter()
    clicks = collections.Counter()
    varied_k = 0
    g = _gen(0)
    for _ in range(n_plans):
        plan = plan_interaction(9, generator=g)
        assert [p.index for p in plan] == list(range(9))
        p0 = plan[0]
        first[p0.kind] += 1
        assert p0.kind in ("box", "point")
        assert p0.clicks == (1 if p0.kind == "point" else 0)
        assert p0.uses_box == (p0.kind == "box") and p0.uses_points == (p0.kind == "point")
        assert p0.train_encoder and p0.train_prompt_encoder and not p0.mask_prompt
        mask_only = [p.index for p in plan if p.kind == "mask_only"]
        assert len(mask_only) == 2 and mask_only[1] == 8 and 2 <= mask_only[0] <= 7
        random_step[mask_only[0]] += 1
        for p in plan[1:]:
            assert not p.train_encoder and not p.train_prompt_encoder and p.mask_prompt
            assert not p.uses_box
            if p.kind == "mask_only":
                assert p.clicks == 0 and not p.uses_points
            else:
                assert p.kind == "clicks" and p.clicks in SAM_MED2D_CLICKS and p.uses_points
                clicks[p.clicks] += 1
        ks = {p.clicks for p in plan if p.kind == "clicks"}
        varied_k += len(ks) > 1
    # Binomial: 0.5 +- 4 standard deviations (sd ~ 0.009).
    assert abs(first["box"] / n_plans - 0.5) < 0.04
    assert set(random_step) == {2, 3, 4, 5, 6, 7}
    for count in random_step.values():  # each 1/6 +- ~5 sd
        assert abs(count / n_plans - 1 / 6) < 0.035
    total = sum(clicks.values())
    assert set(clicks) == set(SAM_MED2D_CLICKS)
    for count in clicks.values():
        assert abs(count / total - 0.25) < 0.02
    # k is drawn per step, not once per batch.
    assert varied_k > 0.9 * n_plans


def test_plan_edge_sizes_and_options():
    kinds = lambda plan: [p.kind for p in plan]
    g = _gen(1)
    assert len(plan_interaction(1, generator=g)) == 1
    assert kinds(plan_interaction(2, generator=g))[1:] == ["mask_only"]
    assert kinds(plan_interaction(3, generator=g))[1:] == ["clicks", "mask_only"]
    assert kinds(plan_interaction(4, generator=g))[1:] == ["clicks", "mask_only", "mask_only"]
    plan = plan_interaction(9, generator=g, random_mask_only=False)
    assert kinds(plan)[1:] == ["clicks"] * 7 + ["mask_only"]
    assert all(
        plan_interaction(9, generator=g, first_prompt_box_prob=1.0)[0].kind == "box"
        for _ in range(20)
    )
    assert all(
        plan_interaction(9, generator=g, first_prompt_box_prob=0.0)[0].kind == "point"
        for _ in range(20)
    )
    plan = plan_interaction(9, generator=g, click_choices=(2,), random_mask_only=False)
    assert [p.clicks for p in plan[1:-1]] == [2] * 7
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        plan_interaction(0, generator=g)
    with pytest.raises(ValueError, match="first_prompt_box_prob"):
        plan_interaction(9, generator=g, first_prompt_box_prob=1.5)
    with pytest.raises(ValueError, match="click_choices"):
        plan_interaction(9, generator=g, click_choices=(0, 1))


def test_plan_is_deterministic_per_seed():
    a = [plan_interaction(9, generator=_gen(5)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    g1, g2 = _gen(5), _gen(5)
    assert [plan_interaction(9, generator=g1) for _ in range(50)] == [
        plan_interaction(9, generator=g2) for _ in range(50)
    ]
    assert len({tuple(plan_interaction(9, generator=_gen(s))) for s in range(50)}) > 40


# ---------------------------------------------------------------------------------------------
# sample_clicks
# ---------------------------------------------------------------------------------------------


def _click_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Six masks, 7 x 11 (non-square so x/y order matters): random, perfect, all wrong, empty
    and correct, only missed foreground, only false foreground."""
    g = _gen(seed)
    h, w = 7, 11
    target = (torch.rand(6, 1, h, w, generator=g) < 0.4).float()
    logits = torch.randn(6, 1, h, w, generator=g) * 4
    logits[1] = torch.where(target[1] > 0, 5.0, -5.0)  # perfect
    logits[2] = torch.where(target[2] > 0, -5.0, 5.0)  # every pixel wrong
    target[3] = 0.0
    logits[3] = -3.0  # empty and correct
    logits[4] = -5.0  # predicts nothing: only missed foreground
    target[5] = 0.0
    logits[5, 0, 2:4, 3:9] = 5.0  # false foreground only
    logits[5, 0, logits[5, 0] != 5.0] = -5.0
    return logits, target


def test_clicks_land_on_errors_of_the_right_type():
    logits, target = _click_batch()
    pred = torch.sigmoid(logits) > 0.5
    truth = target > 0.5
    for seed in range(5):
        coords, labels = sample_clicks(logits, target, k=9, generator=_gen(seed))
        assert coords.shape == (6, 9, 2) and coords.dtype == torch.float32
        assert labels.shape == (6, 9) and labels.dtype == torch.int64
        assert torch.equal(coords, coords.round())
        for i in range(6):
            has_error = bool((pred[i] != truth[i]).any())
            for (x, y), lab in zip(coords[i].long().tolist(), labels[i].tolist(), strict=True):
                assert 0 <= x < 11 and 0 <= y < 7
                p, t = bool(pred[i, 0, y, x]), bool(truth[i, 0, y, x])
                if has_error:
                    assert p != t, f"mask {i}: ({x}, {y}) is not an error pixel"
                    assert lab == (1 if t else 0)
                else:
                    assert lab == -1
    coords, labels = sample_clicks(logits, target, k=9, generator=_gen(0))
    assert (labels[1] == -1).all() and (labels[3] == -1).all()
    assert (labels[4] == 1).all() and (labels[5] == 0).all()


def test_clicks_are_uniform_with_replacement_over_the_error_pixels():
    target = torch.zeros(1, 1, 5, 6)
    logits = torch.full((1, 1, 5, 6), -4.0)
    target[0, 0, 1, 4] = 1  # missed foreground at x=4, y=1
    logits[0, 0, 3, 0] = 4.0  # false foreground at x=0, y=3
    logits[0, 0, 2, 2] = 4.0
    target[0, 0, 2, 2] = 1  # a correct foreground pixel, never picked
    coords, labels = sample_clicks(logits, target, k=6000, generator=_gen(2))
    seen = collections.Counter(
        (tuple(c), lab)
        for c, lab in zip(coords[0].long().tolist(), labels[0].tolist(), strict=True)
    )
    assert set(seen) == {((4, 1), 1), ((0, 3), 0)}
    assert abs(seen[((4, 1), 1)] / 6000 - 0.5) < 0.03
    # No error at all: uniform over every pixel, label -1.
    coords, labels = sample_clicks(
        torch.full((1, 1, 5, 6), -4.0), torch.zeros(1, 1, 5, 6), k=6000, generator=_gen(3)
    )
    cells = collections.Counter(map(tuple, coords[0].long().tolist()))
    assert len(cells) == 30 and (labels == -1).all()
    assert max(cells.values()) < 2 * min(cells.values())


def test_clicks_are_deterministic_per_seed():
    logits, target = _click_batch()
    a = sample_clicks(logits, target, k=5, generator=_gen(9))
    b = sample_clicks(logits, target, k=5, generator=_gen(9))
    c = sample_clicks(logits, target, k=5, generator=_gen(10))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_clicks_accept_bf16_logits_and_reject_bad_shapes():
    logits, target = _click_batch()
    coords, labels = sample_clicks(logits.bfloat16(), target, k=3, generator=_gen(0))
    assert coords.shape == (6, 3, 2)
    with pytest.raises(ValueError, match="sample_clicks: target .* must match logits"):
        sample_clicks(logits[:, :, :4], target, k=3, generator=_gen(0))
    with pytest.raises(ValueError, match="sample_clicks: k must be >= 1"):
        sample_clicks(logits, target, k=0, generator=_gen(0))


# ---------------------------------------------------------------------------------------------
# mask_prompt
# ---------------------------------------------------------------------------------------------


def test_mask_prompt_is_detached_probabilities_or_logits():
    low = torch.randn(3, 1, 4, 4, requires_grad=True)
    probs = mask_prompt(low)
    assert not probs.requires_grad and torch.equal(probs, torch.sigmoid(low.detach()))
    raw = mask_prompt(low, as_probs=False)
    assert not raw.requires_grad and torch.equal(raw, low.detach())


# ---------------------------------------------------------------------------------------------
# No host round-trips in the hot path
# ---------------------------------------------------------------------------------------------

_SYNCING = {"item", "cpu", "numpy", "tolist", "nonzero", "argwhere", "masked_select", "unique"}


@pytest.mark.parametrize(
    "module",
    [interact, losses.terms, losses.interactive, losses.semantic, losses.options],
    ids=lambda m: m.__name__,
)
def test_hot_path_has_no_syncing_calls(module):
    """Static check: no call that copies to the host or has a data-dependent shape, except in
    plan_interaction (host-side by design, on a CPU generator)."""
    tree = ast.parse(Path(inspect.getfile(module)).read_text())
    offenders = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef) or fn.name == "plan_interaction":
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in _SYNCING:
                    offenders.append(f"{fn.name}: .{node.func.attr}()")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                offenders.append(f"{fn.name}: import")
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert "numpy" not in imported, imported
    assert not offenders, offenders


def _hot_path(g: torch.Generator) -> None:
    logits = torch.randn(4, 1, 16, 16, requires_grad=True)
    target = (torch.rand(4, 1, 16, 16) > 0.5).float()
    low = torch.randn(4, 3, 4, 4, requires_grad=True)
    best, iou, _ = losses.select_best(low, torch.rand(4, 3))
    total, _ = losses.sam_med2d_loss(logits, target, iou)
    losses.sam_med2d_loss(logits, target, iou, reduction="per_mask")
    total.backward()
    for name in losses.INTERACTIVE_LOSSES:
        loss_fn = losses.build_interactive_loss(name, iou_target="live")
        loss_fn(logits, target, iou)[0].backward()
    losses.build_interactive_loss("bce_dice", pos_weight=2.0)(logits, target, iou)
    losses.ce_dice_loss(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8)))
    semantic = losses.build_semantic_loss("ce_dice", reduction="mask", include_background=False)
    semantic(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8)))
    sample_clicks(logits, target, k=9, generator=g)
    mask_prompt(best)


def test_hot_path_runs_on_fake_tensors():
    """Dynamic check: under FakeTensorMode there is no data, so any host read (.item(), bool(),
    .tolist(), numpy) or data-dependent shape (nonzero, boolean indexing) raises."""
    with FakeTensorMode():
        _hot_path(torch.Generator())
    # The harness itself can fail: a host read does raise here.
    with pytest.raises(Exception, match="DataDependent|local_scalar_dense|data-dependent"):
        with FakeTensorMode():
            torch.randn(3).sum().item()
    with pytest.raises(Exception, match="DynamicOutputShape|nonzero"):
        with FakeTensorMode():
            torch.randn(3).nonzero()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hot_path_makes_no_cuda_sync():
    torch.set_default_device("cuda")
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        _hot_path(g)  # warm-up (lazy init may sync once)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _hot_path(g)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        torch.set_default_device("cpu")
