"""vpotool.sampling and flow_schedule: prediction algebra, Gaussian log-densities and SDE/DDIM steps against values
worked out by hand, and the sampler loop over tiny oracle backends whose exact answer is known."""

import math

import pytest
import torch
from torch import nn

from vpotool.models.base import NoiseSchedule, flow_schedule
from vpotool.sampling import (
    ddim_step,
    flow_sde_step,
    gaussian_logp,
    guided_prediction,
    sample,
    seeded_noise,
    split_prediction,
    training_target,
)

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
SHAPE = (2, 3, 1, 2)  # a tiny latent [C, F, h, w]


def close(a, b, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=atol, rtol=0
    )


def bcast(v, like):
    v = torch.as_tensor(v, dtype=torch.float32)
    return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim else v


def alpha_for(prediction, sigma):
    """Flow paths use alpha = 1 - sigma; epsilon and v use variance-preserving alpha = sqrt(1 - sigma^2)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return 1 - sigma if prediction == "flow" else torch.sqrt(1 - sigma**2)


# ---------------------------------------------------------------- split_prediction / training_target


@pytest.mark.parametrize("prediction", ["flow", "epsilon", "v"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["scalar", "per-sample"])
def test_split_prediction_inverts_training_target(prediction, per_sample):
    # [B=3, ...] with a last dim of 3 as well, so broadcasting [B] coefficients along the wrong axis would show.
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 1, 2, 3, generator=g) * 2 - 1
    noise = torch.rand(3, 2, 1, 2, 3, generator=g) * 2 - 1
    sigma = torch.tensor([0.2, 0.5, 0.9]) if per_sample else torch.tensor(0.3)
    alpha = alpha_for(prediction, sigma)
    x_t = bcast(alpha, x0) * x0 + bcast(sigma, x0) * noise
    target = training_target(prediction, x0, noise, alpha, sigma)
    x0_hat, noise_hat = split_prediction(target, x_t, alpha, sigma, prediction)
    assert x0_hat.shape == noise_hat.shape == x0.shape
    assert x0_hat.dtype == noise_hat.dtype == torch.float32
    close(x0_hat, x0)
    close(noise_hat, noise)


def test_split_prediction_by_hand():
    # flow at sigma 0.25: x0 = 2, noise = -1 -> x_t = 0.75 * 2 + 0.25 * -1 = 1.25; target v = noise - x0 = -3;
    # x0 = x_t - sigma v = 1.25 + 0.75 = 2; noise = x_t + alpha v = 1.25 - 2.25 = -1.
    x0, n = torch.tensor([[2.0]]), torch.tensor([[-1.0]])
    v = training_target("flow", x0, n, 0.75, 0.25)
    close(v, [[-3.0]])
    x0_hat, n_hat = split_prediction(v, torch.tensor([[1.25]]), 0.75, 0.25, "flow")
    close(x0_hat, [[2.0]])
    close(n_hat, [[-1.0]])
    # VP at alpha 0.8, sigma 0.6: x0 = 1, noise = 2 -> x_t = 0.8 + 1.2 = 2.
    x0, n, x_t = torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.tensor([[2.0]])
    # v-prediction: v = 0.8 * 2 - 0.6 * 1 = 1; x0 = 0.8 * 2 - 0.6 * 1 = 1; noise = 0.6 * 2 + 0.8 * 1 = 2.
    v = training_target("v", x0, n, 0.8, 0.6)
    close(v, [[1.0]])
    x0_hat, n_hat = split_prediction(v, x_t, 0.8, 0.6, "v")
    close(x0_hat, [[1.0]])
    close(n_hat, [[2.0]])
    # epsilon: target is the noise 2; x0 = (2 - 0.6 * 2) / 0.8 = 1.
    eps = training_target("epsilon", x0, n, 0.8, 0.6)
    close(eps, [[2.0]])
    x0_hat, n_hat = split_prediction(eps, x_t, 0.8, 0.6, "epsilon")
    close(x0_hat, [[1.0]])
    close(n_hat, [[2.0]])


def test_unknown_prediction_type_is_refused():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="sample"):
        split_prediction(x, x, 0.5, 0.5, "sample")
    with pytest.raises(ValueError, match="sample"):
        training_target("sample", x, x, 0.5, 0.5)


# ---------------------------------------------------------------- gaussian_logp


def test_gaussian_logp_matches_torch_normal():
    g = torch.Generator().manual_seed(1)
    x, mean = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    expected = torch.distributions.Normal(mean, 0.7).log_prob(x).flatten(1).mean(1)
    close(gaussian_logp(x, mean, 0.7), expected, atol=1e-5)
    std = torch.tensor([0.5, 2.0])
    expected = torch.distributions.Normal(mean, std.view(2, 1, 1)).log_prob(x).flatten(1).mean(1)
    out = gaussian_logp(x, mean, std)
    assert out.shape == (2,) and out.dtype == torch.float32
    close(out, expected, atol=1e-5)


def test_gaussian_logp_by_hand():
    mean = torch.full((2, 5), 3.0)
    # At the mean the density is 1 / (std sqrt(2 pi)): with std 2, -log 2 - log sqrt(2 pi) = -1.6120857.
    close(gaussian_logp(mean.clone(), mean, 2.0), [-1.6120857] * 2)
    # One std away: -0.5 more.
    close(gaussian_logp(mean + 2.0, mean, 2.0), [-2.1120857] * 2)
    close(gaussian_logp(mean, mean, 1.0), [-LOG_SQRT_2PI] * 2)


def test_gaussian_logp_gradient_reaches_mean_not_x():
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    mean = torch.tensor([[0.0, 0.0]], requires_grad=True)
    gaussian_logp(x, mean, 0.5).sum().backward()
    assert x.grad is None
    # d/dmean of mean_j(-(x_j - m_j)^2 / (2 * 0.25)) = (x_j - m_j) / 0.25 / 2 elements = [2, 4].
    close(mean.grad, [[2.0, 4.0]])


# ---------------------------------------------------------------- flow_sde_step


def test_flow_sde_step_without_noise_is_euler():
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, *SHAPE, generator=g), torch.randn(2, *SHAPE, generator=g)
    z = torch.randn(2, *SHAPE, generator=g)
    x_next, mean, std = flow_sde_step(x, v, 0.6, 0.4, 0.0, z)
    close(x_next, x + v * (0.4 - 0.6))
    close(mean, x_next)
    assert float(std.abs().max()) == 0.0


def test_flow_sde_step_by_hand():
    # s = 0.5, s' = 0.25, a = 0.7: std_t = 0.7 * sqrt(0.5 / 0.5) = 0.7, dt = -0.25, std_t^2 = 0.49;
    # mean = x (1 + 0.49 / 1 * -0.25) + v (1 + 0.49 * 0.5 / 1) * -0.25 = 0.8775 x - 0.31125 v
    # x = 2, v = -1: mean = 1.755 + 0.31125 = 2.06625; std = 0.7 * sqrt(0.25) = 0.35.
    x, v = torch.tensor([[2.0]]), torch.tensor([[-1.0]])
    x_next, mean, std = flow_sde_step(x, v, 0.5, 0.25, 0.7, torch.zeros(1, 1))
    close(mean, [[2.06625]])
    close(x_next, [[2.06625]])
    close(std, 0.35)
    x_next, _, _ = flow_sde_step(x, v, 0.5, 0.25, 0.7, torch.ones(1, 1))
    close(x_next, [[2.06625 + 0.35]])


def test_flow_sde_step_std_per_sample():
    s, s1 = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.1])
    x = torch.zeros(2, *SHAPE)
    _, _, std = flow_sde_step(x, x, s, s1, 0.7, torch.zeros_like(x))
    expected = 0.7 * torch.sqrt(s / (1 - s)) * torch.sqrt(s - s1)  # [0.6261, 0.4427]
    close(std.flatten(), expected)
    close(std.flatten(), [0.7 * 2 * math.sqrt(0.2), 0.7 * math.sqrt(0.4)])


def test_flow_sde_step_at_sigma_one_uses_next_sigma():
    # s = 1, s' = 0.8, a = 0.5: std_t = 0.5 * sqrt(0.8 / 0.2) = 1, dt = -0.2;
    # mean = x (1 + 1 / 2 * -0.2) + v (1 + 0) * -0.2 = 0.9 x - 0.2 v; x = v = 1 -> 0.7; std = sqrt(0.2).
    x_next, mean, std = flow_sde_step(torch.ones(1, 3), torch.ones(1, 3), 1.0, 0.8, 0.5, torch.zeros(1, 3))
    assert torch.isfinite(x_next).all() and torch.isfinite(std).all()
    close(mean, [[0.7] * 3])
    close(std, math.sqrt(0.2))


# ---------------------------------------------------------------- ddim_step


def test_ddim_step_eta_zero():
    # alpha' = 0.8, sigma' = 0.6: x0 = 1, noise = 2 -> 0.8 + 1.2 = 2.
    x_next, mean, std = ddim_step(
        torch.tensor([[1.0]]), torch.tensor([[2.0]]), 0.6, 0.8, 0.8, 0.6, 0.0, z=torch.ones(1, 1)
    )
    close(x_next, [[2.0]])
    close(mean, [[2.0]])
    assert float(std) == 0.0


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_step_stochastic_by_hand(eta):
    # abar = 0.36, abar' = 0.64: std = eta sqrt(0.36 / 0.64 * (1 - 0.36 / 0.64)) = eta sqrt(0.5625 * 0.4375)
    # = eta * 0.4960783; mean = 0.8 x0 + sqrt(1 - 0.64 - std^2) noise (at eta = 1: sqrt(0.11390625) = 0.3375).
    std_hand = eta * math.sqrt(0.5625 * 0.4375)
    x0, n = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    x_next, mean, std = ddim_step(x0, n, 0.6, 0.8, 0.8, 0.6, eta, z=torch.ones(1, 1))
    close(std, std_hand)
    close(mean, [[0.8 + math.sqrt(0.36 - std_hand**2) * 2.0]])
    if eta == 1.0:
        close(mean, [[0.8 + 0.3375 * 2.0]])
    close(x_next, mean + std_hand)


def test_ddim_step_to_clean_point_is_deterministic():
    x0, n = torch.tensor([[1.5, -0.5]]), torch.tensor([[2.0, 1.0]])
    x_next, mean, std = ddim_step(x0, n, 0.8, 0.6, 1.0, 0.0, 1.0, z=torch.ones(1, 2))
    assert float(std) == 0.0
    close(mean, x0)
    close(x_next, x0)


# ---------------------------------------------------------------- seeded_noise


def test_seeded_noise_rows_depend_only_on_their_seed():
    alone = seeded_noise(SHAPE, [7], "cpu")
    batch = seeded_noise(SHAPE, [3, 7], "cpu")
    flipped = seeded_noise(SHAPE, [7, 3], "cpu")
    assert batch.shape == (2, *SHAPE) and batch.dtype == torch.float32
    assert torch.equal(batch[1], alone[0])
    assert torch.equal(flipped[0], alone[0])
    assert torch.equal(flipped[1], batch[0])
    assert not torch.equal(batch[0], batch[1])
    assert seeded_noise(SHAPE, [7], "cpu", dtype=torch.float64).dtype == torch.float64


# ---------------------------------------------------------------- tiny oracle backends


class FlowOracle:
    """A flow "denoiser" that knows the data point: ``v = (x_t - x0) / sigma`` is the exact velocity of the straight
    path from ``x0``, so every Euler step is exact and the ODE sampler lands on ``x0``."""

    prediction = "flow"
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, x0, shift=1.0):
        self.x0, self.shift, self.calls = x0, shift, []

    def schedule(self, steps, shape=None):
        return flow_schedule(steps, self.shift)

    def predict(self, x_t, timesteps, cond):
        self.calls.append((x_t.shape[0], timesteps.clone()))
        sigma = (timesteps / 1000.0).view(-1, 1, 1, 1, 1)
        return (x_t - self.x0) / sigma


class ScaledFlowOracle(FlowOracle):
    """FlowOracle times a trainable scale (1 at init), to follow gradients through the sampler."""

    def __init__(self, x0):
        super().__init__(x0)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def predict(self, x_t, timesteps, cond):
        return self.scale * super().predict(x_t, timesteps, cond)


class CondEcho:
    """A flow backend whose output is its conditioning embedding, broadcast over the latent."""

    prediction = "flow"
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self):
        self.calls = []

    def schedule(self, steps, shape=None):
        return flow_schedule(steps)

    def predict(self, x_t, timesteps, cond):
        self.calls.append((x_t.shape[0], timesteps.clone()))
        return cond["emb"].view(-1, 1, 1, 1, 1).expand_as(x_t).clone()


def vp_schedule(steps):
    """A cosine variance-preserving grid: u from 0.98 to 0, alpha = cos(pi u / 2), sigma = sin(pi u / 2)."""
    u = torch.linspace(0.98, 0.0, steps + 1)
    return NoiseSchedule(
        timesteps=u[:-1] * 1000.0, alphas=torch.cos(math.pi / 2 * u), sigmas=torch.sin(math.pi / 2 * u)
    )


class VPOracle:
    """An epsilon- or v-prediction "denoiser" on the cosine VP grid that knows ``x0``:
    eps = (x_t - alpha x0) / sigma."""

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, x0, prediction):
        self.x0, self.prediction = x0, prediction

    def schedule(self, steps, shape=None):
        return vp_schedule(steps)

    def predict(self, x_t, timesteps, cond):
        u = (timesteps / 1000.0).view(-1, 1, 1, 1, 1)
        alpha, sigma = torch.cos(math.pi / 2 * u), torch.sin(math.pi / 2 * u)
        eps = (x_t - alpha * self.x0) / sigma
        return eps if self.prediction == "epsilon" else alpha * eps - sigma * self.x0


COND = {"emb": torch.zeros(2, 4)}


def target_x0():
    return torch.linspace(-1, 1, math.prod(SHAPE)).view(1, *SHAPE)


def noise(seeds=(0, 1)):
    return seeded_noise(SHAPE, list(seeds), "cpu")


# ---------------------------------------------------------------- sample()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ode_sampler_lands_on_the_oracle_target(shift):
    x0, n = target_x0(), noise()
    backend = FlowOracle(x0, shift)
    traj = sample(backend, COND, n, steps=5, keep_states=True)
    assert traj.logps is None
    assert traj.latents.shape == n.shape
    close(traj.latents, x0.expand_as(n), atol=1e-5)
    # Each visited state lies on the straight path (1 - s) x0 + s n.
    sched = flow_schedule(5, shift)
    assert len(traj.states) == 6
    for state, s in zip(traj.states, sched.sigmas, strict=True):
        close(state, (1 - s) * x0 + s * n, atol=1e-5)
    # One batched call per step, at the schedule's timesteps.
    assert len(backend.calls) == 5
    for (b, t), t_ref in zip(backend.calls, sched.timesteps, strict=True):
        assert b == 2 and t.shape == (2,)
        close(t, [float(t_ref)] * 2, atol=1e-3)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_sampler_lands_on_the_oracle_target(prediction):
    x0, n = target_x0(), noise()
    traj = sample(VPOracle(x0, prediction), COND, n, steps=4)
    close(traj.latents, x0.expand_as(n), atol=1e-4)
    # The last DDIM step (alpha' = 1) is deterministic, so a stochastic run lands there too.
    traj = sample(VPOracle(x0, prediction), COND, n, steps=4, noise_level=1.0, step_seeds=[0, 1])
    close(traj.latents, x0.expand_as(n), atol=1e-4)
    assert traj.logps.shape == (2, 4) and torch.isfinite(traj.logps).all()


def test_explicit_schedule_overrides_the_backend():
    x0, n = target_x0(), noise()
    backend = VPOracle(x0, "epsilon")
    backend.schedule = None  # must not be called
    traj = sample(backend, COND, n, steps=3, schedule=vp_schedule(3))
    close(traj.latents, x0.expand_as(n), atol=1e-4)


def test_guided_prediction_combines_branches():
    backend = CondEcho()
    cond, uncond = {"emb": torch.tensor([1.0, 2.0])}, {"emb": torch.tensor([0.5, -1.0])}
    x = torch.zeros(2, *SHAPE)
    out = guided_prediction(backend, x, torch.tensor(500.0), cond, uncond, 3.0)
    # u + g (c - u) = [0.5 + 3 * 0.5, -1 + 3 * 3] = [2, 8]
    close(out[:, 0, 0, 0, 0], [2.0, 8.0])
    assert backend.calls[-1][0] == 4  # both branches in one batched call
    close(backend.calls[-1][1], [500.0] * 4)
    # guidance 1 (or no uncond) is the conditional branch alone, in a call of the plain batch.
    close(guided_prediction(backend, x, torch.tensor(500.0), cond, uncond, 1.0)[:, 0, 0, 0, 0], [1.0, 2.0])
    close(guided_prediction(backend, x, torch.tensor(500.0), cond, None, 3.0)[:, 0, 0, 0, 0], [1.0, 2.0])
    assert [c[0] for c in backend.calls[-2:]] == [2, 2]


def test_sample_uses_guided_velocity():
    # One flow step from sigma 1 to 0 is x' = x - v, with v the guided output [2, 8].
    backend = CondEcho()
    cond, uncond = {"emb": torch.tensor([1.0, 2.0])}, {"emb": torch.tensor([0.5, -1.0])}
    n = noise()
    traj = sample(backend, cond, n, steps=1, guidance=3.0, uncond=uncond)
    close(traj.latents, n - torch.tensor([2.0, 8.0]).view(2, 1, 1, 1, 1))


def test_stochastic_sampling_is_reproducible_per_seed():
    x0, n = target_x0(), noise((3, 7))
    kw = dict(steps=4, noise_level=0.7)
    a = sample(FlowOracle(x0), COND, n, step_seeds=[3, 7], **kw)
    b = sample(FlowOracle(x0), COND, n, step_seeds=[3, 7], **kw)
    c = sample(FlowOracle(x0), COND, n, step_seeds=[4, 8], **kw)
    assert a.logps.shape == (2, 4) and a.logps.dtype == torch.float32
    assert torch.isfinite(a.logps).all() and torch.isfinite(a.latents).all()
    assert torch.equal(a.latents, b.latents) and torch.equal(a.logps, b.logps)
    assert not torch.allclose(a.latents, c.latents)
    # The row of seed 7 does not depend on which other samples share its batch.
    alone = sample(FlowOracle(x0), COND, noise((7,)), step_seeds=[7], **kw)
    close(alone.latents[0], a.latents[1], atol=1e-6)
    close(alone.logps[0], a.logps[1], atol=1e-5)
    flipped = sample(FlowOracle(x0), COND, n.flip(0), step_seeds=[7, 3], **kw)
    close(flipped.latents.flip(0), a.latents, atol=1e-6)
    # Noise > 0 moves away from the deterministic end point.
    ode = sample(FlowOracle(x0), COND, n, steps=4)
    assert not torch.allclose(a.latents, ode.latents, atol=1e-3)


def test_stochastic_logps_are_the_step_densities():
    x0, n = target_x0(), noise()
    backend = FlowOracle(x0)
    traj = sample(backend, COND, n, steps=3, noise_level=0.7, step_seeds=[0, 1], keep_states=True)
    sched = flow_schedule(3)
    for i in range(3):
        x, x_next = traj.states[i], traj.states[i + 1]
        v = backend.predict(x, sched.timesteps[i].expand(2), COND)
        _, mean, std = flow_sde_step(x, v, sched.sigmas[i], sched.sigmas[i + 1], 0.7)
        close(traj.logps[:, i], gaussian_logp(x_next, mean, std), atol=1e-4)


def test_stochastic_sampling_without_seeds_runs():
    traj = sample(FlowOracle(target_x0()), COND, noise(), steps=2, noise_level=0.5)
    assert traj.logps.shape == (2, 2) and torch.isfinite(traj.logps).all()


def test_no_graph_outside_grad_steps():
    backend = ScaledFlowOracle(target_x0())
    traj = sample(backend, COND, noise(), steps=3)
    assert not traj.latents.requires_grad
    traj = sample(backend, COND, noise(), steps=3, noise_level=0.7, step_seeds=[0, 1])
    assert not traj.latents.requires_grad and not traj.logps.requires_grad
    with torch.no_grad():
        assert not sample(backend, COND, noise(), steps=3, grad_steps=[2]).latents.requires_grad


def test_gradient_window_on_last_step():
    x0 = target_x0()
    backend = ScaledFlowOracle(x0)
    traj = sample(backend, COND, noise(), steps=3, grad_steps=[2], keep_states=True)
    assert traj.latents.requires_grad
    traj.latents.sum().backward()
    # Only the last step sees the scale: x' = x + w v (0 - s) with v = (x - x0) / s, so d sum(x') / dw = -sum(x - x0).
    expected = -(traj.states[2] - x0).sum()
    assert backend.scale.grad is not None and abs(float(backend.scale.grad)) > 1e-3
    close(backend.scale.grad, expected, atol=1e-4)


def test_gradient_window_in_stochastic_logps():
    backend = ScaledFlowOracle(target_x0())
    traj = sample(backend, COND, noise(), steps=3, noise_level=0.7, step_seeds=[0, 1], grad_steps=[2])
    (g_first,) = torch.autograd.grad(traj.logps[:, 0].sum(), backend.scale, retain_graph=True, allow_unused=True)
    (g_last,) = torch.autograd.grad(traj.logps[:, 2].sum(), backend.scale, allow_unused=True)
    assert g_first is None or float(g_first) == 0.0
    assert g_last is not None and abs(float(g_last)) > 1e-6


# ---------------------------------------------------------------- flow_schedule


def test_flow_schedule_unshifted():
    sched = flow_schedule(4)
    assert len(sched) == 4
    assert sched.timesteps.shape == (4,) and sched.sigmas.shape == sched.alphas.shape == (5,)
    assert sched.sigmas.dtype == torch.float32
    close(sched.sigmas, [1.0, 0.75, 0.5, 0.25, 0.0])
    close(sched.alphas, [0.0, 0.25, 0.5, 0.75, 1.0])
    close(sched.timesteps, [1000.0, 750.0, 500.0, 250.0], atol=1e-3)


def test_flow_schedule_shift_by_hand():
    # shift 3 at s = 0.5: 3 * 0.5 / (1 + 2 * 0.5) = 0.75; the endpoints stay at 1 and 0.
    sched = flow_schedule(2, shift=3.0)
    close(sched.sigmas, [1.0, 0.75, 0.0])
    close(sched.alphas, 1 - sched.sigmas)
    close(sched.timesteps, sched.sigmas[:-1] * 1000, atol=1e-3)
    sigmas = flow_schedule(10, shift=3.0).sigmas
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all()
