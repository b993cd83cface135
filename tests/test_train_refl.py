"""train-refl on the tiny model: held-out reward rises, the adapter changes, gradient windows and frame
selection behave, and a non-differentiable reward is refused."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import held_out_brightness, scored_fps

from vpotool.training.config import ReflConfig
from vpotool.training.refl import train_refl
from vpotool.training.reward import select_frames, selected_fps

SIZE = dict(frames=5, height=16, width=16, steps=4, guidance=1.0)


def config(prompts, out, **kw) -> ReflConfig:
    base = dict(prompts=str(prompts), out=str(out), reward="brightness", max_steps=8, lr=3e-2, batch_size=2)
    return ReflConfig(**{**base, **SIZE, "lora_rank": 4, "device": "cpu", **kw})


@pytest.mark.parametrize("mode", ["last", "random"])
def test_refl_raises_held_out_reward_and_changes_the_adapter(prompts, tmp_path, mode):
    from vpotool.models import load_backend
    from vpotool.training.lora import adapter_state

    backend = load_backend("tiny")
    before = held_out_brightness(backend, SIZE)
    seen = {}

    def on_step(step, trainer):
        state = adapter_state(trainer.denoiser)
        seen.setdefault("first", {k: v.clone() for k, v in state.items()})
        seen["last"] = {k: v.clone() for k, v in state.items()}

    train_refl(
        config(prompts, tmp_path / "out", backprop_mode=mode, backprop_steps=2), backend=backend, on_step=on_step
    )
    backend.denoiser.eval()
    after = held_out_brightness(backend, SIZE)
    assert after > before + 0.02, (before, after)
    assert any(not torch.equal(seen["first"][k], seen["last"][k]) for k in seen["first"])
    metrics = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert list(metrics.step) == list(range(1, 9)) and metrics.reward.iloc[-1] > metrics.reward.iloc[0]
    assert (tmp_path / "out" / "checkpoints" / "step-8" / "pytorch_lora_weights.safetensors").is_file()


def test_refl_rewards_rollouts_at_the_fps_score_uses(prompts, tmp_path, fps_seen):
    """A reward that takes fps (raft's VBench frame stride) sees the videos' fps in training, as in ``score``."""
    train_refl(config(prompts, tmp_path / "out", reward="fps-seen", max_steps=1))
    trained = set(fps_seen)
    assert trained == scored_fps(fps_seen, prompts, tmp_path / "run", SIZE) == {8}  # the tiny model's fps


def test_select_frames():
    frames = torch.arange(8.0).view(1, 8, 1, 1, 1).expand(1, 8, 3, 2, 2)
    assert select_frames(frames, "all").shape[1] == 8
    assert select_frames(frames, "first-middle-last")[0, :, 0, 0, 0].tolist() == [0.0, 4.0, 7.0]
    assert select_frames(frames, "3")[0, :, 0, 0, 0].tolist() == [0.0, 4.0, 7.0]  # 0, 3.5 -> 4, 7
    assert select_frames(frames, "20").shape[1] == 8
    assert selected_fps(24, 8, "all") == 24 and selected_fps(24, 8, "20") == 24
    assert selected_fps(24, 49, "3") == selected_fps(24, 49, "first-middle-last") == 1.0  # 24 frames apart
    assert selected_fps(24, 49, "1") == 24


def test_gradient_reaches_only_through_the_window():
    """With K = 1 the loss depends on the adapter only through the last step: the adapter still gets a gradient,
    while the initial noise gets none (steps before the window ran without a graph)."""
    from vpotool.models import load_backend
    from vpotool.sampling import sample, seeded_noise
    from vpotool.training.lora import add_lora

    b = load_backend("tiny")
    params = add_lora(b.denoiser, 2, 2, b.lora_target_modules)
    for p in params:
        p.data.normal_(0, 0.01)
    noise = seeded_noise(b.latent_shape(5, 16, 16), [1], "cpu").requires_grad_(True)
    traj = sample(b, b.encode_prompts(["a red dot"]), noise, steps=4, grad_steps=[3])
    traj.latents.mean().backward()
    assert noise.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_non_differentiable_reward_is_refused(cli, prompts, tmp_path, monkeypatch):
    from vpotool import rewards
    from vpotool.rewards.simple import BrightnessReward

    class Frozen(BrightnessReward):
        differentiable = False

    monkeypatch.setitem(rewards.REWARDS, "frozen", lambda **kw: Frozen())
    code, _, err = cli(
        "train-refl", "--prompts", prompts, "--reward", "frozen", "--out", tmp_path / "o", "--device", "cpu"
    )
    assert code == 2 and "not differentiable" in err and len(err.strip().splitlines()) == 1


def test_reward_frames_decode_only_the_prefix_they_need():
    """Wan's VAE decodes latent frame by latent frame with a causal cache: the frames the reward sees, decoded from
    the shortest prefix of latents that holds them, equal the whole decode's (so --reward-frames 1 decodes one latent
    frame, and its graph is that frame's alone)."""
    from vpotool.models import load_backend
    from vpotool.training.refl import decode_for_reward
    from vpotool.training.reward import frame_index

    tiny_backend = load_backend("tiny")
    torch.manual_seed(0)
    latents = torch.randn(1, *tiny_backend.latent_shape(17, 32, 32))
    full = tiny_backend.decode(latents)
    settings = {"frames": 17, "height": 32, "width": 32}
    decoded = []  # latent frames through the decoder (it takes them one at a time)
    tiny_backend.codec.vae.decoder.register_forward_hook(lambda m, args, out: decoded.append(args[0].shape[2]))
    for spec, latent_frames in (("1", 1), ("2", 5), ("first-middle-last", 5), ("all", 5)):
        decoded.clear()
        frames = decode_for_reward(tiny_backend, latents, settings, spec)
        assert torch.equal(frames, full[:, frame_index(17, spec)])
        assert sum(decoded) == latent_frames
