"""ops.cam: MMCAM and Grad-CAM rules against hand-computed numbers and naive loops."""

from __future__ import annotations

import pytest
import torch

from robustft.ops.cam import cam_to_grid, gradcam, grid_to_cam, mmcam, normalize_cam


def _naive_mmcam(attn: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """Per image, per head, written out as plainly as possible."""
    batch, _, length, _ = attn[0].shape
    rows = []
    for b in range(batch):
        r = torch.eye(length)
        for a, g in zip(attn, grads):
            heads = a.shape[1]
            abar = sum(torch.clamp(g[b, h] * a[b, h], min=0) for h in range(heads)) / heads
            r = r + abar @ r
        rows.append(r[0, 1:])
    return torch.stack(rows)


def _naive_gradcam(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(act.shape[0], act.shape[1] - 1)
    for b in range(act.shape[0]):
        weights = grad[b].sum(dim=0)
        for n in range(1, act.shape[1]):
            out[b, n - 1] = max(float((weights * act[b, n]).sum()), 0.0)
    return out


def test_mmcam_hand_computed_two_layers():
    # Layer 1, two heads. Elementwise grad*A, negatives clamped to 0:
    #   head 1: [[.5,.6,0],[.1,.8,.1],[.2,.2,.6]]   head 2: [[0,.2,.6],[.6,0,0],[.5,0,1]]
    #   Abar1 = mean = [[.25,.4,.3],[.35,.4,.05],[.35,.1,.8]];  R1 = I + Abar1 @ I
    #   => R1 = [[1.25,.4,.3],[.35,1.4,.05],[.35,.1,1.8]], CAM after layer 1 = [.4, .3]
    a1 = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]],
                       [[0.2, 0.2, 0.6], [0.3, 0.4, 0.3], [0.5, 0.25, 0.25]]]).unsqueeze(0)
    g1 = torch.tensor([[[1.0, 2.0, -1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
                       [[0.0, 1.0, 1.0], [2.0, 0.0, 0.0], [1.0, -4.0, 4.0]]]).unsqueeze(0)
    torch.testing.assert_close(mmcam([a1], [g1]), torch.tensor([[0.4, 0.3]]))
    # Layer 2, one head; grad is 1 except -1 at [0, 2] => Abar2 = [[.6,.2,0],[.3,.3,.4],[.1,.1,.8]]
    #   (Abar2 @ R1)[0] = .6*[1.25,.4,.3] + .2*[.35,1.4,.05] = [.82,.52,.19]
    #   R2[0] = R1[0] + that = [2.07, .92, .49]  => CAM = [.92, .49]
    a2 = torch.tensor([[[[0.6, 0.2, 0.2], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]]]])
    g2 = torch.ones_like(a2)
    g2[0, 0, 0, 2] = -1.0
    torch.testing.assert_close(mmcam([a1, a2], [g1, g2]), torch.tensor([[0.92, 0.49]]))
    # the order of layers matters: reversed gives a different rollout
    assert not torch.allclose(mmcam([a2, a1], [g2, g1]), torch.tensor([[0.92, 0.49]]))


def test_mmcam_matches_naive_loop_and_is_nonnegative():
    gen = torch.Generator().manual_seed(0)
    attn = [torch.rand(3, 2, 5, 5, generator=gen).softmax(-1) for _ in range(3)]
    grads = [torch.randn(3, 2, 5, 5, generator=gen) for _ in range(3)]
    cam = mmcam(attn, grads)
    assert cam.shape == (3, 4) and cam.dtype == torch.float32
    assert (cam >= 0).all()
    torch.testing.assert_close(cam, _naive_mmcam(attn, grads))


def test_mmcam_half_precision_is_computed_in_float32():
    gen = torch.Generator().manual_seed(1)
    attn = [torch.rand(2, 2, 4, 4, generator=gen).softmax(-1) for _ in range(2)]
    grads = [torch.randn(2, 2, 4, 4, generator=gen) for _ in range(2)]
    cam16 = mmcam([a.bfloat16() for a in attn], [g.bfloat16() for g in grads])
    assert cam16.dtype == torch.float32
    torch.testing.assert_close(cam16, mmcam(attn, grads), rtol=0.05, atol=0.02)


def test_mmcam_is_differentiable():
    attn = torch.rand(1, 2, 3, 3).softmax(-1).requires_grad_()
    grads = torch.randn(1, 2, 3, 3)
    mmcam([attn], [grads]).sum().backward()
    assert attn.grad is not None and attn.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [
    ([], []),
    ([torch.rand(1, 1, 3, 3)], []),
    ([torch.rand(1, 1, 3, 3)], [torch.rand(1, 1, 4, 4)]),
    ([torch.rand(1, 3, 3)], [torch.rand(1, 3, 3)]),
])
def test_mmcam_rejects_bad_inputs(bad):
    with pytest.raises(ValueError):
        mmcam(*bad)


def test_gradcam_hand_computed_sums_gradient_over_all_tokens():
    # grad summed over ALL tokens (CLS included): w = [1 + .5 - .5, 0 + 1 + 2] = [1, 3]
    # patch 1: 1*1 + 3*2 = 7; patch 2: 1*3 + 3*(-2) = -3 -> relu -> 0
    # (without the CLS row, w would be [0, 3] and patch 1 would be 6)
    act = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, -2.0]]])
    grad = torch.tensor([[[1.0, 0.0], [0.5, 1.0], [-0.5, 2.0]]])
    torch.testing.assert_close(gradcam(act, grad), torch.tensor([[7.0, 0.0]]))


def test_gradcam_matches_naive_loop():
    gen = torch.Generator().manual_seed(2)
    act, grad = torch.randn(3, 6, 4, generator=gen), torch.randn(3, 6, 4, generator=gen)
    torch.testing.assert_close(gradcam(act, grad), _naive_gradcam(act, grad))
    with pytest.raises(ValueError):
        gradcam(act, grad[:, :-1])


def test_normalize_cam_divides_by_row_max_without_min_subtraction():
    cam = torch.tensor([[2.0, 1.0, 0.5], [0.0, 0.0, 0.0], [4.0, 4.0, 3.0]])
    out = normalize_cam(cam)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.5, 0.25], [0.0, 0.0, 0.0], [1.0, 1.0, 0.75]]))
    assert not out.isnan().any()
    # the eps is added to the max: a tiny CAM's maximum maps to 1e-7 / (1e-7 + 1e-8) = 10/11
    tiny = normalize_cam(torch.tensor([[1e-7, 5e-8]]))
    torch.testing.assert_close(tiny, torch.tensor([[10 / 11, 5 / 11]]))


def test_cam_grid_round_trip_is_row_major():
    cam = torch.arange(12.0).reshape(2, 6)
    grid = cam_to_grid(cam, (2, 3))
    assert grid.shape == (2, 2, 3)
    assert grid[0, 1, 0] == 3.0  # second row of patches starts at token 3
    torch.testing.assert_close(grid_to_cam(grid), cam)
    with pytest.raises(ValueError, match="2x2"):
        cam_to_grid(cam, (2, 2))
