"""ops.masking: strategy parsing, patch selection, donors, refills and the entry point."""

from __future__ import annotations

import pytest
import torch

from robustft.errors import ConfigError
from robustft.ops.masking import (
    MASKING_DEFAULTS,
    MASKING_NAMES,
    MaskingSpec,
    build_counterfactual,
    grid_shape,
    keep_indices_random,
    key_mask_from,
    make_generator,
    multi_donors,
    parse_masking,
    patchify,
    refill,
    select_patches,
    single_donors,
    unpatchify,
)

PATCH = 4


def _images(batch: int = 4, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- parsing
def test_all_nine_names_parse_to_their_defaults():
    assert len(MASKING_NAMES) == 9
    for name in MASKING_NAMES:
        spec = parse_masking(name)
        assert spec.name == f"{name}({MASKING_DEFAULTS[name]!r})"
    assert parse_masking("ObjMaskSingleFill").value == 0.3
    assert parse_masking("RandMaskNoFill").value == 0.75
    assert parse_masking("ObjMaskMultiFill").value == 0.6


def test_paper_notation_is_case_insensitive_and_whitespace_tolerant():
    spec = parse_masking("  objmasksinglefill ( 0.25 ) ")
    assert spec == MaskingSpec("obj", "single", 0.25)
    assert str(spec) == spec.name == "ObjMaskSingleFill(0.25)"
    assert spec.needs_cam and not parse_masking("RandMaskMultiFill(0.1)").needs_cam
    assert parse_masking("CtxMaskNoFill(1)") == MaskingSpec("ctx", "none", 1.0)
    derange = parse_masking("ObjMaskSingleFill(0.3, donors=Derangement)")
    assert derange.donors == "derangement" and str(derange) == "ObjMaskSingleFill(0.3, derangement)"
    assert parse_masking(str(derange)) == derange


def test_structured_dicts():
    assert parse_masking({"region": "obj", "fill": "single", "value": 0.3}) == parse_masking("ObjMaskSingleFill(0.3)")
    assert parse_masking({"region": "CTX", "fill": "multi"}).value == MASKING_DEFAULTS["CtxMaskMultiFill"]
    spec = parse_masking({"region": "rand", "fill": "single", "value": 0.5, "donors": "derangement"})
    assert spec.donors == "derangement"
    assert parse_masking(spec.as_dict()) == spec
    assert parse_masking(spec) is spec


@pytest.mark.parametrize("bad, fragment", [
    ("ObjMaskSingelFill(0.3)", "did you mean 'ObjMaskSingleFill'"),
    ("Foo(0.3)", "RandMaskNoFill"),
    ("ObjMaskSingleFill(1.3)", "1.3 is outside the valid range [0, 1]"),
    ("ObjMaskSingleFill(-0.1)", "-0.1 is outside"),
    ("ObjMaskSingleFill(0.3", "expected e.g. 'ObjMaskSingleFill(0.3)'"),
    ("ObjMaskSingleFill(0.3, 0.4, 0.5)", "expected e.g."),
    ("ObjMaskSingleFill(abc)", "not a number"),
    ("ObjMaskSingleFill(0.3, sometimes)", "donors"),
    ("ObjMaskMultiFill(0.3, derangement)", "only applies to SingleFill"),
    ({"region": "obj", "fill": "single", "ratio": 0.3}, "unknown masking key"),
    ({"region": "obj"}, "missing fill"),
    ({"region": "object", "fill": "single"}, "region"),
    ({"region": "obj", "fill": "single", "value": 2}, "2.0 is outside"),
    ({"region": "obj", "fill": "single", "value": True}, "must be a number"),
    (0.3, "must be a string"),
])
def test_bad_specs_raise_one_line_config_errors(bad, fragment):
    with pytest.raises(ConfigError) as info:
        parse_masking(bad)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- patches
def test_grid_shape_and_patchify_round_trip():
    assert grid_shape(224, 32) == (7, 7)
    assert grid_shape((8, 12), 4) == (2, 3)
    with pytest.raises(ConfigError, match="not divisible by the patch size 32"):
        grid_shape(100, 32)
    images = torch.rand(2, 3, 8, 12)
    patches = patchify(images, PATCH)
    assert patches.shape == (2, 6, 3, 4, 4)
    # row-major: patch 4 is row 1, column 1 of the grid
    assert torch.equal(patches[1, 4], images[1, :, 4:8, 4:8])
    assert torch.equal(unpatchify(patches, (2, 3)), images)


# ----------------------------------------------------------------------------- selection
def test_rand_mask_rate_is_near_p():
    mask = select_patches(parse_masking("RandMaskSingleFill(0.3)"), num_patches=100, batch=200, generator=_gen())
    assert mask.dtype == torch.bool and mask.shape == (200, 100)
    assert abs(mask.float().mean().item() - 0.3) < 0.01  # 20k draws: std ~0.003
    assert not select_patches(parse_masking("RandMaskMultiFill(0)"), num_patches=9, batch=3, generator=_gen()).any()
    assert select_patches(parse_masking("RandMaskMultiFill(1)"), num_patches=9, batch=3, generator=_gen()).all()


def test_obj_and_ctx_thresholds_are_strict_and_complementary():
    cam = torch.tensor([[0.0, 0.3, 0.31, 1.0], [0.2, 0.29, 0.5, 0.3]])
    obj = select_patches(parse_masking("ObjMaskSingleFill(0.3)"), num_patches=4, batch=2, cam_norm=cam,
                         generator=_gen())
    ctx = select_patches(parse_masking("CtxMaskSingleFill(0.3)"), num_patches=4, batch=2, cam_norm=cam,
                         generator=_gen())
    assert obj.tolist() == [[False, False, True, True], [False, False, True, False]]
    assert torch.equal(ctx, ~obj)
    with pytest.raises(ConfigError, match="cam_norm"):
        select_patches(parse_masking("ObjMaskNoFill(0.3)"), num_patches=4, batch=2, generator=_gen())


def test_same_seed_same_draw_and_ranks_differ():
    spec = parse_masking("RandMaskMultiFill(0.5)")
    draw = lambda g: select_patches(spec, num_patches=49, batch=8, generator=g)  # noqa: E731
    assert torch.equal(draw(make_generator(3, 0)), draw(make_generator(3, 0)))
    assert not torch.equal(draw(make_generator(3, 0)), draw(make_generator(3, 1)))
    assert not torch.equal(draw(make_generator(3, 0)), draw(make_generator(4, 0)))
    assert make_generator(3, 1).initial_seed() == 3 * 1_000_003 + 1
    with pytest.raises(ConfigError):
        make_generator(0, -1)


def test_keep_indices_are_unique_sorted_and_counted():
    keep = keep_indices_random(5, 49, 0.75, _gen())
    assert keep.shape == (5, 12) and keep.dtype == torch.long  # int(49 * 0.25) = 12
    assert (keep[:, 1:] > keep[:, :-1]).all()  # strictly increasing: sorted and unique
    assert keep.min() >= 0 and keep.max() < 49
    assert len({tuple(row) for row in keep.tolist()}) > 1  # images draw different tokens
    assert keep_indices_random(2, 10, 1.0, _gen()).shape == (2, 0)
    assert keep_indices_random(2, 10, 0.0, _gen()).tolist() == [list(range(10))] * 2


# ----------------------------------------------------------------------------- donors
def test_single_donors_permutation_and_derangement():
    fixed_points = 0
    for seed in range(50):
        perm = single_donors(5, _gen(seed))
        assert sorted(perm.tolist()) == list(range(5))
        fixed_points += int((perm == torch.arange(5)).sum())
        der = single_donors(5, _gen(seed), derangement=True)
        assert sorted(der.tolist()) == list(range(5)) and not (der == torch.arange(5)).any()
    assert fixed_points > 0  # the faithful permutation does keep some images as their own donor
    assert single_donors(2, _gen(), derangement=True).tolist() == [1, 0]
    with pytest.raises(ConfigError, match="at least 2"):
        single_donors(1, _gen(), derangement=True)
    assert single_donors(1, _gen()).tolist() == [0]


def test_multi_donors_are_uniform_over_other_images():
    donors = multi_donors(4, 3000, _gen())
    assert donors.shape == (4, 3000) and donors.dtype == torch.long
    assert not (donors == torch.arange(4).unsqueeze(1)).any()
    for i in range(4):
        counts = torch.bincount(donors[i], minlength=4).float() / 3000
        others = [j for j in range(4) if j != i]
        assert counts[i] == 0 and (counts[others] - 1 / 3).abs().max() < 0.04
    with pytest.raises(ConfigError, match="at least 2"):
        multi_donors(1, 4, _gen())


# ----------------------------------------------------------------------------- refill
def test_refill_hand_built_single_and_multi():
    images = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(3)])  # image i is all i
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = True  # top-right patch of image 0
    out = refill(images, mask, torch.tensor([2, 0, 1]), PATCH)
    assert (out[0, :, 0:4, 4:8] == 2).all() and (out[0, :, :, 0:4] == 0).all() and (out[0, :, 4:8] == 0).all()
    assert torch.equal(out[1:], images[1:])
    donors = torch.tensor([[1, 2, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    mask[0, 3] = True
    out = refill(images, mask, donors, PATCH)
    assert (out[0, :, 0:4, 4:8] == 2).all() and (out[0, :, 4:8, 4:8] == 1).all() and (out[0, :, 0:4, 0:4] == 0).all()


@pytest.mark.parametrize("name", ["RandMaskSingleFill(0.5)", "RandMaskMultiFill(0.5)", "ObjMaskSingleFill(0.3)",
                                  "CtxMaskMultiFill(0.4)", "ObjMaskSingleFill(0.3, derangement)"])
def test_refill_properties(name):
    images = _images(batch=5, size=16)
    spec = parse_masking(name)
    cam = torch.rand(5, 16, generator=_gen(9))
    cf = build_counterfactual(images, spec, patch=PATCH, cam_norm=cam, generator=_gen(1))
    assert cf.keep_idx is None and cf.key_mask is None and cf.donors is not None
    src, out = patchify(images, PATCH), patchify(cf.images, PATCH)
    donors = cf.donors if cf.donors.dim() == 2 else cf.donors.unsqueeze(1).expand(5, 16)
    for b in range(5):  # naive per-patch check of the vectorised refill
        for n in range(16):
            expected = src[donors[b, n], n] if cf.mask[b, n] else src[b, n]
            assert torch.equal(out[b, n], expected)
    if spec.needs_cam:
        assert torch.equal(cf.mask, select_patches(spec, num_patches=16, batch=5, cam_norm=cam, generator=_gen()))
    if spec.fill == "multi" or spec.donors == "derangement":
        assert not (donors == torch.arange(5).unsqueeze(1)).any()


def test_refill_is_differentiable_and_leaves_input_untouched():
    images = _images(batch=3).requires_grad_()
    before = images.detach().clone()
    mask = torch.tensor([[True, False, False, True]] * 3)
    out = refill(images, mask, torch.tensor([1, 2, 0]), PATCH)
    out.sum().backward()
    assert torch.equal(images.detach(), before)
    # every pixel is used exactly once (donor patches come from a permutation): gradient is all ones
    assert torch.equal(images.grad, torch.ones_like(images))
    with torch.no_grad():
        assert not refill(images, mask, torch.tensor([1, 2, 0]), PATCH).requires_grad


# ----------------------------------------------------------------------------- NoFill + entry point
def test_nofill_counterfactuals():
    images = _images(batch=3, size=16)
    cf = build_counterfactual(images, parse_masking("RandMaskNoFill(0.75)"), patch=PATCH, generator=_gen())
    assert cf.images is images and cf.donors is None and cf.key_mask is None
    assert cf.keep_idx.shape == (3, 4)  # int(16 * 0.25)
    assert (cf.mask.sum(1) == 12).all()
    assert not cf.mask.gather(1, cf.keep_idx).any()
    cam = torch.rand(3, 16, generator=_gen(5))
    cf = build_counterfactual(images, parse_masking("CtxMaskNoFill(0.6)"), patch=PATCH, cam_norm=cam, generator=_gen())
    assert cf.images is images and cf.keep_idx is None and cf.donors is None
    assert torch.equal(cf.key_mask, cam <= 0.6) and cf.key_mask.dtype == torch.bool
    assert key_mask_from(torch.tensor([[1, 0]])).tolist() == [[True, False]]


def test_build_counterfactual_is_deterministic_per_seed():
    images = _images(batch=6, size=16)
    spec = parse_masking("RandMaskSingleFill(0.5)")
    a = build_counterfactual(images, spec, patch=PATCH, generator=make_generator(0, 0))
    b = build_counterfactual(images, spec, patch=PATCH, generator=make_generator(0, 0))
    c = build_counterfactual(images, spec, patch=PATCH, generator=make_generator(0, 1))
    assert torch.equal(a.images, b.images) and torch.equal(a.mask, b.mask) and torch.equal(a.donors, b.donors)
    assert not torch.equal(a.mask, c.mask)
    with pytest.raises(ConfigError, match="not divisible"):
        build_counterfactual(_images(size=10), spec, patch=PATCH, generator=_gen())
