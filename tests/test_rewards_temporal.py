"""Weight-free temporal rewards: hand-computed values, behaviour on synthetic videos, contract, gradients, registry."""

import pytest
import torch

from vpotool.errors import VpoError
from vpotool.rewards import Reward, load_reward, reward_names
from vpotool.rewards.temporal import (
    DynamicsReward,
    FlickerReward,
    SmoothnessReward,
    TemporalReward,
    dynamics_score,
    flicker_score,
    smoothness_score,
)

ALL = [FlickerReward, SmoothnessReward, DynamicsReward, TemporalReward]


def constant_video(levels, size=4):
    """One video [1, T, 3, size, size] whose frame t is filled with levels[t]."""
    return torch.tensor(levels, dtype=torch.float32).view(1, -1, 1, 1, 1).expand(1, len(levels), 3, size, size).clone()


def moving_square(frames=6, size=16, side=4, step=2):
    """A white square on black moving right by ``step`` pixels per frame: [1, T, 3, size, size]."""
    video = torch.zeros(1, frames, 3, size, size)
    for t in range(frames):
        x = t * step
        video[0, t, :, 6 : 6 + side, x : x + side] = 1.0
    return video


def flashing(frames=6, size=16):
    """Alternating black and white frames: [1, T, 3, size, size]."""
    return constant_video([float(t % 2) for t in range(frames)], size)


def test_flicker_by_hand():
    assert flicker_score(constant_video([0.2, 0.5])).item() == pytest.approx(0.7)
    # Pairs differ by 0.3 and 0.1: mean 0.2.
    assert flicker_score(constant_video([0.2, 0.5, 0.4])).item() == pytest.approx(0.8)
    assert flicker_score(constant_video([0.3])).item() == 1.0


def test_smoothness_by_hand():
    assert smoothness_score(constant_video([0.2, 0.5, 0.8])).item() == pytest.approx(1.0)
    # Middle rebuilt as 0.3, actual 0.5: MAE 0.2.
    assert smoothness_score(constant_video([0.2, 0.5, 0.4])).item() == pytest.approx(0.8)
    # T = 5: odd frames 1 and 3 rebuilt as 0.3 and 0.6, errors 0.1 and 0.0.
    assert smoothness_score(constant_video([0.2, 0.4, 0.4, 0.6, 0.8])).item() == pytest.approx(0.95)
    # T = 4: the last odd frame has no right neighbour and is skipped.
    assert smoothness_score(constant_video([0.0, 0.5, 1.0, 0.0])).item() == pytest.approx(1.0)
    # T < 3: nothing to interpolate.
    assert smoothness_score(constant_video([0.0, 1.0])).item() == 1.0


def test_dynamics_by_hand():
    video = torch.zeros(1, 2, 3, 4, 4)
    video[0, 1, 0, 2, 3] = 0.6  # one pixel, one channel: per-pixel change 0.2
    # 16 pixels * 0.05 rounds to k = 1: the largest change.
    assert dynamics_score(video).item() == pytest.approx(0.2)
    assert dynamics_score(video, top_fraction=1.0).item() == pytest.approx(0.2 / 16)
    assert dynamics_score(constant_video([0.5])).item() == 0.0


def test_static_video_is_steady_and_scores_no_dynamics():
    static = constant_video([0.4] * 6, size=16)
    out = TemporalReward()(static, ["p"])
    assert out["flicker"].item() == 1.0
    assert out["smoothness"].item() == 1.0
    assert out["dynamic_degree"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["overall"].item() == pytest.approx(2.0 / 2.5)


def test_motion_and_flashing_are_told_apart():
    reward = TemporalReward()
    static, moving, flash = constant_video([0.0] * 6, size=16), moving_square(), flashing()
    scores = {name: reward(video, ["p"]) for name, video in [("static", static), ("moving", moving), ("flash", flash)]}
    assert scores["moving"]["dynamic_degree"].item() > 0.5 > scores["static"]["dynamic_degree"].item()
    assert scores["flash"]["flicker"].item() < scores["moving"]["flicker"].item()
    assert scores["flash"]["smoothness"].item() < scores["moving"]["smoothness"].item()
    # Stable motion beats a frozen video, which beats flashing.
    assert scores["moving"]["overall"].item() > scores["static"]["overall"].item() > scores["flash"]["overall"].item()


@pytest.mark.parametrize("cls", ALL)
def test_output_contract(cls):
    reward = cls()
    assert isinstance(reward, Reward)
    assert "overall" in reward.dimensions
    frames = torch.rand(2, 5, 3, 8, 8, dtype=torch.float64)
    out = reward(frames, ["a", "b"])
    assert tuple(out) == reward.dimensions
    for value in out.values():
        assert value.shape == (2,)
        assert value.dtype == torch.float32
        assert ((value >= 0) & (value <= 1)).all()


@pytest.mark.parametrize("cls", ALL)
def test_bad_input_raises(cls):
    reward = cls()
    with pytest.raises(ValueError):
        reward(torch.rand(2, 3, 8, 8), ["a", "b"])
    with pytest.raises(ValueError):
        reward(torch.rand(1, 3, 1, 8, 8), ["a"])
    with pytest.raises(ValueError):
        reward(torch.rand(2, 3, 3, 8, 8), ["a"])
    with pytest.raises(ValueError):
        reward(torch.zeros(1, 3, 3, 8, 8, dtype=torch.uint8), ["a"])


def test_bad_options_raise():
    with pytest.raises(VpoError, match="top_fraction"):
        DynamicsReward(top_fraction=0.0)
    with pytest.raises(VpoError, match="weights"):
        TemporalReward(flicker=-1.0)
    with pytest.raises(VpoError, match="weights"):
        TemporalReward(flicker=0.0, smoothness=0.0, dynamics=0.0)


@pytest.mark.parametrize("cls", ALL)
def test_gradient_reaches_pixels(cls):
    frames = torch.rand(2, 5, 3, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    cls()(frames, ["a", "b"])["overall"].sum().backward()
    assert torch.isfinite(frames.grad).all()
    assert frames.grad.abs().sum() > 0


def test_registry():
    reward = load_reward("temporal")
    assert isinstance(reward, TemporalReward)
    assert load_reward("dynamics", top_fraction=0.1).top_fraction == 0.1
    assert reward_names("flicker,temporal") == ["flicker", "temporal"]
    with pytest.raises(VpoError, match="flicker") as info:
        reward_names("flicker,sparkle")
    assert "sparkle" in str(info.value) and "temporal" in str(info.value)
