"""Focal loss against the paper's formula and torchvision's, its properties, and the box losses."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss
from torchvision.ops import sigmoid_focal_loss as tv_focal

from retinanet.losses import box_regression_loss, sigmoid_focal_loss


def logits_and_targets(seed, n=5000):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=gen) * 4
    targets = (torch.rand(n, generator=gen) < 0.3).float()
    return logits, targets


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 1.0), (-1.0, 2.0), (0.25, 0.0), (0.9, 3.5)])
def test_focal_matches_torchvision(alpha, gamma):
    logits, targets = logits_and_targets(0)
    ours = sigmoid_focal_loss(logits, targets, alpha, gamma)
    torch.testing.assert_close(ours, tv_focal(logits, targets, alpha, gamma, reduction="none"))
    torch.testing.assert_close(ours, paper_focal(logits, targets, alpha, gamma).float())


def paper_focal(logits, targets, alpha, gamma):
    """Lin et al., eq. 5, written out in float64: the oracle that is neither ours nor torchvision's."""
    x, y = logits.double(), targets.double()
    log_p, log_not_p = F.logsigmoid(x), F.logsigmoid(-x)  # log p and log(1 - p), stable
    log_p_t = y * log_p + (1 - y) * log_not_p
    alpha_t = (alpha * y + (1 - alpha) * (1 - y)) if alpha >= 0 else torch.ones_like(y)
    return -alpha_t * (1 - log_p_t.exp()) ** gamma * log_p_t


def test_focal_golden():
    # logit 0 -> p = 0.5. Target 1: CE = log 2, (1 - p_t)^2 = 0.25, alpha_t = 0.25 -> 0.0625 log 2.
    # Target 0: same CE and modulator, alpha_t = 0.75 -> 0.1875 log 2.
    out = sigmoid_focal_loss(torch.zeros(2), torch.tensor([1.0, 0.0]), alpha=0.25, gamma=2.0)
    torch.testing.assert_close(out, torch.tensor([0.0625, 0.1875]) * math.log(2.0))
    # logit log 3 -> p = 0.75, target 1: CE = log(4/3), (1 - 0.75)^2 = 1/16, alpha 0.25 -> log(4/3) / 64
    out = sigmoid_focal_loss(torch.tensor([math.log(3.0)]), torch.tensor([1.0]), alpha=0.25, gamma=2.0)
    torch.testing.assert_close(out, torch.tensor([math.log(4 / 3) / 64]))


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.5), (-1.0, 2.0), (0.75, 0.0)])
def test_focal_never_exceeds_bce(alpha, gamma):
    # alpha_t <= 1 and (1 - p_t)^gamma <= 1, so FL <= CE elementwise, for alpha in [0, 1] or disabled
    logits, targets = logits_and_targets(1)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert (sigmoid_focal_loss(logits, targets, alpha, gamma) <= bce + 1e-7).all()


def test_focal_equals_bce_without_alpha_and_gamma():
    logits, targets = logits_and_targets(2)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha=-1.0, gamma=0.0), bce)


def test_focal_down_weights_easy_examples():
    # a confident correct prediction (logit 5, target 1) loses far more than a wrong one under FL
    easy, hard = sigmoid_focal_loss(torch.tensor([5.0, -5.0]), torch.ones(2), alpha=-1.0, gamma=2.0)
    easy_ce, hard_ce = F.binary_cross_entropy_with_logits(torch.tensor([5.0, -5.0]), torch.ones(2), reduction="none")
    assert easy / easy_ce < 1e-4 and hard / hard_ce > 0.98


def test_focal_is_float32_and_stable_for_half_and_extreme_logits():
    logits = torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0]).bfloat16()
    targets = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    out = sigmoid_focal_loss(logits, targets)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # logit -100 with target 1: CE ~ 100, modulator ~ 1, alpha 0.25 -> ~25
    assert out[0].item() == pytest.approx(25.0, rel=1e-3)


def test_focal_gradients_match_torchvision():
    logits, targets = logits_and_targets(3, n=300)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    c = logits.double().requires_grad_(True)
    sigmoid_focal_loss(a, targets).sum().backward()
    tv_focal(b, targets, reduction="sum").backward()
    paper_focal(c, targets, 0.25, 2.0).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(a.grad, c.grad.float())


def test_box_losses():
    gen = torch.Generator().manual_seed(4)
    deltas = torch.randn(50, 4, generator=gen)
    target = torch.randn(50, 4, generator=gen)
    torch.testing.assert_close(box_regression_loss("l1", deltas, target), (deltas - target).abs().sum())
    torch.testing.assert_close(box_regression_loss("smooth_l1", deltas, target, beta=0.1),
                               F.smooth_l1_loss(deltas, target, beta=0.1, reduction="sum"))
    xy = torch.rand(50, 2, generator=gen) * 100
    pred = torch.cat([xy, xy + 5 + torch.rand(50, 2, generator=gen) * 50], 1)
    gt = torch.cat([xy + 3, xy + 10 + torch.rand(50, 2, generator=gen) * 50], 1)
    giou = box_regression_loss("giou", deltas, None, pred, gt)
    torch.testing.assert_close(giou, generalized_box_iou_loss(pred, gt, reduction="sum"))
    torch.testing.assert_close(giou.double(), shapely_giou_loss(pred, gt), rtol=1e-5, atol=1e-4)
    assert box_regression_loss("giou", deltas, None, gt, gt).item() == pytest.approx(0.0, abs=1e-5)


def shapely_giou_loss(pred, gt) -> torch.Tensor:
    """Summed 1 - GIoU from shapely's areas (Rezatofighi et al.): the oracle outside torch."""
    import shapely

    a, b = shapely.box(*pred.double().T.numpy()), shapely.box(*gt.double().T.numpy())
    inter, union = shapely.area(shapely.intersection(a, b)), shapely.area(shapely.union(a, b))
    hull = shapely.area(shapely.envelope(shapely.union(a, b)))
    return torch.tensor((1 - (inter / union - (hull - union) / hull)).sum(), dtype=torch.float64)


def test_box_loss_smooth_l1_golden():
    # |x| = 0.05 < beta 0.1 -> 0.5 x^2 / beta = 0.0125; |x| = 1 -> |x| - beta / 2 = 0.95
    out = box_regression_loss("smooth_l1", torch.tensor([[0.05, 1.0, 0.0, 0.0]]), torch.zeros(1, 4), beta=0.1)
    assert out.item() == pytest.approx(0.0125 + 0.95)


def test_unknown_box_loss_named_in_error():
    with pytest.raises(ValueError, match=r"unknown box loss 'iou'.*'l1', 'smooth_l1' or 'giou'"):
        box_regression_loss("iou", torch.zeros(1, 4), torch.zeros(1, 4))
