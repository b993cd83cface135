"""Loss functions against values computed by hand."""

import math

import pytest
import torch

from vpotool.losses import (
    awm_loss,
    dpo_loss,
    group_advantage,
    kl_to_reference,
    leave_one_out_advantage,
    nft_loss,
    nft_optimality,
    normalize_advantage,
    per_sample_mse,
    policy_gradient_loss,
    refl_loss,
    scst_advantage,
)
from vpotool.sampling import gaussian_logp


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_per_sample_mse_by_hand():
    pred = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]], dtype=torch.bfloat16)  # [2, 1, 2]
    out = per_sample_mse(pred, torch.zeros(2, 1, 2))
    assert out.dtype == torch.float32 and out.shape == (2,)
    assert close(out, [2.5, 0.0])  # (1 + 4) / 2, 0


def test_dpo_sigmoid_is_ln2_at_initialisation():
    errs_w, errs_l = t(0.3, 1.2, 0.7), t(0.9, 0.4, 0.7)
    out = dpo_loss(errs_w, errs_l, errs_w.clone(), errs_l.clone(), beta=5000.0)
    assert close(out.loss, math.log(2))
    assert close(out.inside, [0.0, 0.0, 0.0])
    assert out.implicit_acc.item() == 0.5
    assert out.reward_margin.item() == 0.0


def test_dpo_sigmoid_worked_example():
    # beta = 2; model_diff = 0.25 - 1.0 = -0.75, ref_diff = 0.5 - 0.25 = 0.25
    # inside = -0.5 * 2 * (-0.75 - 0.25) = 1  ->  loss = log(1 + e^-1) = 0.3132617
    pw, pl = t(0.25, grad=True), t(1.0, grad=True)
    out = dpo_loss(pw, pl, t(0.5), t(0.25), beta=2.0)
    assert close(out.loss, 0.3132617)
    assert close(out.inside, [1.0]) and out.implicit_acc.item() == 1.0 and close(out.reward_margin, 1.0)
    assert close(out.model_diff, -0.75) and close(out.ref_diff, 0.25)
    out.loss.backward()
    # d loss / d policy_w = sigmoid(-inside) * 0.5 * beta = sigmoid(-1) = 0.2689414; the loser's is its negative
    assert close(pw.grad, [0.2689414]) and close(pl.grad, [-0.2689414])


def test_dpo_gradient_direction_and_sgd_step():
    ref_w, ref_l = t(0.8, 0.5, 1.1), t(0.6, 0.9, 1.0)
    pw, pl = ref_w.clone().requires_grad_(), ref_l.clone().requires_grad_()
    before = dpo_loss(pw, pl, ref_w, ref_l, beta=10.0)
    before.loss.backward()
    assert (pw.grad > 0).all() and (pl.grad < 0).all()  # descent lowers the winner's error relative to the loser's
    with torch.no_grad():
        pw -= 0.01 * pw.grad
        pl -= 0.01 * pl.grad
    after = dpo_loss(pw, pl, ref_w, ref_l, beta=10.0)
    assert after.loss < before.loss
    assert (after.inside > before.inside).all()
    assert after.implicit_acc.item() == 1.0 > before.implicit_acc.item() == 0.5


def test_dpo_reference_gets_no_gradient():
    pw, pl = t(0.2, 0.4, grad=True), t(0.3, 0.1, grad=True)
    ref_w, ref_l = t(0.5, 0.5, grad=True), t(0.1, 0.6, grad=True)
    for loss_type in ("sigmoid", "hinge", "ipo"):
        dpo_loss(pw, pl, ref_w, ref_l, beta=3.0, loss_type=loss_type).loss.backward()
        assert ref_w.grad is None and ref_l.grad is None
        assert pw.grad is not None


def test_dpo_implicit_acc_counts_ties_as_half():
    # inside = -0.5 * 2 * (policy_w - policy_l) with a zero reference: [1, 0, 2, 0, -1] -> (1 + .5 + 1 + .5 + 0) / 5
    pw, zero = t(-1.0, 0.0, -2.0, 0.0, 1.0), torch.zeros(5)
    out = dpo_loss(pw, zero, zero, zero, beta=2.0)
    assert close(out.inside, [1.0, 0.0, 2.0, 0.0, -1.0])
    assert close(out.implicit_acc, 0.6)


def test_dpo_hinge_by_hand():
    # sample 1 as in the worked example (inside = 1); sample 2: model_diff = 0.5, ref_diff = 0 -> inside = -0.5
    # hinge = (relu(1 - 1) + relu(1 + 0.5)) / 2 = 0.75
    out = dpo_loss(t(0.25, 1.0), t(1.0, 0.5), t(0.5, 0.5), t(0.25, 0.5), beta=2.0, loss_type="hinge")
    assert close(out.loss, 0.75)
    assert close(out.implicit_acc, 0.5)


def test_dpo_ipo_by_hand_and_beta_free():
    # h = ref_diff - model_diff = [0.25 + 0.75, 0 - 0.5] = [1, -0.5]
    args = (t(0.25, 1.0), t(1.0, 0.5), t(0.5, 0.5), t(0.25, 0.5))
    # tau = 0.5 -> target 1: ((1 - 1)^2 + (-0.5 - 1)^2) / 2 = 1.125
    assert close(dpo_loss(*args, beta=2.0, loss_type="ipo", ipo_tau=0.5).loss, 1.125)
    # tau = 1 -> target 0.5: (0.5^2 + 1^2) / 2 = 0.625, whatever beta
    assert close(dpo_loss(*args, beta=2.0, loss_type="ipo", ipo_tau=1.0).loss, 0.625)
    assert close(dpo_loss(*args, beta=7.0, loss_type="ipo", ipo_tau=1.0).loss, 0.625)
    with pytest.raises(ValueError, match="ipo_tau"):
        dpo_loss(*args, beta=2.0, loss_type="ipo", ipo_tau=0.0)


def test_dpo_unknown_type_lists_known():
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo"):
        dpo_loss(t(0.1), t(0.2), t(0.1), t(0.2), beta=1.0, loss_type="kto")


def test_refl_loss_by_hand():
    reward = t(1.0, 3.0, grad=True)
    loss = refl_loss(reward)
    assert close(loss, -2.0)
    loss.backward()
    assert close(reward.grad, [-0.5, -0.5])  # descent raises every reward
    assert close(refl_loss(t(1.0, 3.0), target=2.5), 1.0)  # (1.5 + 0.5) / 2
    assert close(refl_loss(t(1.0, 3.0), target=t(1.0, 2.0)), 0.5)  # (0 + 1) / 2


def test_scst_advantage_sign():
    adv = scst_advantage(t(0.8, 0.3), t(0.5, 0.5))
    assert close(adv, [0.3, -0.2])  # the sample that beat its greedy baseline is pushed up


def test_group_advantage_by_hand():
    r = t(1.0, 2.0, 3.0, 10.0, 10.0, 10.0)
    # group 1: mean 2, population std sqrt(2/3) = 0.8164966 -> +-1 / (0.8164966 + 1e-4) = +-1.2245949
    # group 2: all equal -> 0 / (0 + 1e-4) = 0
    assert close(group_advantage(r, 3), [-1.2245949, 0.0, 1.2245949, 0.0, 0.0, 0.0])
    # batch scope: mean 6, squared deviations 25+16+9+16+16+16 = 98, std sqrt(98/6) = 4.0414519
    assert close(group_advantage(r, 3, scope="batch"), [-0.2474297, 0.0, 0.2474297, 0.0, 0.0, 0.0])
    assert close(group_advantage(t(5.0, 5.0), 1), [0.0, 0.0])
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantage(r, 4)
    with pytest.raises(ValueError, match="scope"):
        group_advantage(r, 3, scope="prompt")


def test_normalize_advantage_by_hand():
    # rms of [3, -4] = sqrt(12.5) = 3.5355339 -> [0.8485, -1.1314], then clip to +-1
    assert close(normalize_advantage(t(3.0, -4.0), eps=0.0), [0.8485281, -1.1313708])
    assert close(normalize_advantage(t(3.0, -4.0), clip=1.0, eps=0.0), [0.8485281, -1.0])
    assert close(normalize_advantage(t(3.0, -4.0, 1.0), clip=2.0, scale=False), [2.0, -2.0, 1.0])
    assert close(normalize_advantage(t(0.0, 0.0)), [0.0, 0.0])


def test_reinforce_loss_by_hand():
    logp = torch.tensor([[0.1, 0.2], [0.3, -0.4]], requires_grad=True)
    adv = t(2.0, -1.0)
    loss = policy_gradient_loss(logp, adv)
    assert close(loss, -0.35)  # -(2 * 0.3 + (-1) * (-0.1)) / 2
    loss.backward()
    # d loss / d logp[b, s] = -A_b / B: negative where A > 0, so descent raises those log-probs
    assert close(logp.grad, [[-1.0, -1.0], [0.5, 0.5]])


def test_ppo_clipped_loss_by_hand():
    ratios = torch.tensor([[1.1, 1.5], [0.9, 0.5]])
    logp = ratios.log().requires_grad_()
    adv = t(1.0, -1.0)
    loss = policy_gradient_loss(logp, adv, logp_old=torch.zeros(2, 2), clip_eps=0.2)
    # A = +1: 1.1 inside the range -> -1.1; 1.5 clipped -> max(-1.5, -1.2) = -1.2
    # A = -1: 0.9 inside the range -> 0.9; 0.5 clipped -> max(0.5, 0.8) = 0.8
    assert close(loss, (-1.1 - 1.2 + 0.9 + 0.8) / 4)
    loss.backward()
    # d/dlogp of -A * ratio is -A * ratio / 4 inside the range, zero where the clipped term wins
    assert close(logp.grad, [[-1.1 / 4, 0.0], [0.9 / 4, 0.0]])


def test_ppo_unclipped_side_and_reinforce_agreement():
    # A > 0 with ratio below 1 - eps: the unclipped term is the larger one (-0.5 > -0.8), so the gradient flows
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    loss = policy_gradient_loss(logp, t(1.0), logp_old=torch.zeros(1, 1), clip_eps=0.2)
    assert close(loss, -0.5)
    loss.backward()
    assert close(logp.grad, [[-0.5]])
    # at ratio == 1 the PPO gradient is the REINFORCE gradient divided by the number of steps
    lp1 = torch.tensor([[0.1, -0.2, 0.3]], requires_grad=True)
    lp2 = lp1.detach().clone().requires_grad_()
    policy_gradient_loss(lp1, t(2.0)).backward()
    policy_gradient_loss(lp2, t(2.0), logp_old=lp2.detach(), clip_eps=0.1).backward()
    assert close(lp2.grad, lp1.grad / 3)


def test_policy_gradient_shape_errors():
    with pytest.raises(ValueError, match="logp"):
        policy_gradient_loss(torch.zeros(3), t(1.0, 2.0, 3.0))


def test_log_prob_of_a_gaussian_step():
    # x = 1, mean = 0, std = 2: -(1 - 0)^2 / (2 * 4) - log 2 - 0.5 log(2 pi) = -1.7370857
    expected = -1 / 8 - math.log(2) - 0.5 * math.log(2 * math.pi)
    mean = torch.zeros(1, 2, requires_grad=True)
    logp = gaussian_logp(torch.tensor([[1.0, -1.0]]), mean, 2.0)
    assert logp.shape == (1,) and close(logp, [expected]) and close(expected, -1.7370857)
    logp.sum().backward()
    assert close(mean.grad, [[0.125, -0.125]])  # (x - mean) / std^2, averaged over the 2 dims


def test_kl_to_reference_by_hand():
    mean_pi = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    # mean squared differences [5, 4]
    assert close(kl_to_reference(mean_pi, torch.zeros(2, 2), 2.0), [5 / 8, 4 / 8])
    assert close(kl_to_reference(mean_pi, torch.zeros(2, 2), t(2.0, 1.0)), [5 / 8, 2.0])
    assert close(kl_to_reference(mean_pi, torch.zeros(2, 2), torch.tensor([2.0, 1.0]).view(2, 1, 1)), [5 / 8, 2.0])
    mean_pi.requires_grad_()
    ref = torch.ones(2, 2, requires_grad=True)
    kl_to_reference(mean_pi, ref, 1.0).sum().backward()
    assert ref.grad is None
    assert close(mean_pi.grad, [[0.0, 1.0], [0.5, 0.5]])  # (mean_pi - ref) / (D * std^2) with D = 2


def test_leave_one_out_advantage_by_hand():
    adv = leave_one_out_advantage(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), 3)
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    with pytest.raises(ValueError, match="2 or more"):
        leave_one_out_advantage(torch.ones(4), 1)


def test_awm_loss_by_hand():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    target, adv = torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([2.0, -1.0])
    loss = awm_loss(pred, target, adv)  # errors 2.5 and 1.0
    assert loss.item() == pytest.approx((2 * 2.5 - 1.0) / 2)
    loss.backward()  # d/dpred of mean(A * mean((pred - target)^2)) = A * 2 (pred - target) / 2 / B
    torch.testing.assert_close(pred.grad, torch.tensor([[1.0, 2.0], [0.5, 0.5]]))
    normed = awm_loss(pred, target, adv, self_normalize=True)  # errors over mean |diff|: 2.5 / 1.5 and 1 / 1
    assert normed.item() == pytest.approx((2 * 2.5 / 1.5 - 1.0) / 2)


def test_nft_loss_by_hand():
    torch.testing.assert_close(nft_optimality(torch.tensor([10.0, -1.0, 0.0]), 5.0), torch.tensor([1.0, 0.4, 0.5]))
    x0 = torch.zeros(2, 2)
    pos, neg = torch.tensor([[1.0, 3.0], [2.0, 2.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    # r = [1, 0]; positive side of sample 0: mean(1, 9) / mean(1, 3) = 2.5; negative side of sample 1: 0.5 / 0.5
    loss = nft_loss(pos, neg, x0, torch.tensor([5.0, -5.0]), beta=0.5, adv_max=5.0)
    assert loss.item() == pytest.approx(5.0 * (2.5 / 0.5 + 1.0 / 0.5) / 2)
    with pytest.raises(ValueError, match="beta > 0"):
        nft_loss(pos, neg, x0, torch.zeros(2), beta=0.0, adv_max=5.0)


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_gradient_with_the_old_policy_equal_is_advantage_weighted_matching(beta):
    """With v_old == v (in value), NFT's gradient is mean(clip(A) * grad(e / w)) of the clean-latent error."""
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, generator=gen), torch.randn(3, 2, 4, generator=gen)
    t = torch.tensor([0.2, 0.5, 0.9]).view(-1, 1, 1)
    x_t, adv = (1 - t) * x0 + t * noise, torch.tensor([1.5, -0.5, 7.0])
    v = torch.randn(3, 2, 4, generator=gen, requires_grad=True)
    old = v.detach()
    nft_loss(
        x_t - t * (beta * v + (1 - beta) * old), x_t - t * ((1 + beta) * old - beta * v), x0, adv, beta, 5.0
    ).backward()
    grad_nft, v.grad = v.grad.clone(), None
    diff = x_t - t * v - x0
    w = diff.detach().abs().reshape(3, -1).mean(1)
    ((adv.clamp(-5, 5) * (diff**2).reshape(3, -1).mean(1) / w).mean()).backward()
    torch.testing.assert_close(grad_nft, v.grad)
