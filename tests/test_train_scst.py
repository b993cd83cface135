"""train-scst on the tiny model: recomputed log-probabilities match the rollout's, held-out reward rises with
both baselines, PPO epochs count as optimizer steps, and advantages carry the SCST sign."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import held_out_brightness

from vpotool.config import ScstConfig
from vpotool.training.scst import collect, train_scst

SIZE = dict(frames=4, height=16, width=16, steps=4, guidance=1.0)


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text("a red circle moving left\na blue square moving up\n")
    return p


def config(prompts, out, **kw) -> ScstConfig:
    base = dict(prompts=str(prompts), out=str(out), reward="brightness", max_steps=10, lr=5e-2, batch_size=2)
    return ScstConfig(**{**base, **SIZE, "lora_rank": 4, "normalize": True, "device": "cpu", **kw})


def test_recomputed_step_logps_match_the_rollout(prompts, tmp_path):
    from vpotool.models import load_backend
    from vpotool.rewards import load_reward
    from vpotool.sampling import step_logp

    b = load_backend("tiny")
    cfg = config(prompts, tmp_path / "o", baseline="greedy")
    settings = {**SIZE}
    ro = collect(b, load_reward("brightness"), ["a red dot", "a blue dot"], [1, 2], settings, cfg)
    assert ro.logps.shape == (2, 4) and len(ro.states) == 5
    torch.testing.assert_close(
        ro.advantage, (ro.reward - ro.baseline) / ((ro.reward - ro.baseline).pow(2).mean().sqrt() + 1e-4)
    )
    sched = b.schedule(4, b.latent_shape(4, 16, 16))
    for i in range(4):
        logp, _, _ = step_logp(b, sched, i, ro.states[i], ro.states[i + 1], ro.cond, ro.uncond, 1.0, cfg.noise_level)
        torch.testing.assert_close(logp, ro.logps[:, i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("baseline", ["greedy", "group-mean"])
def test_scst_raises_held_out_reward_and_changes_the_adapter(prompts, tmp_path, baseline):
    from vpotool.models import load_backend
    from vpotool.training.lora import adapter_state

    backend = load_backend("tiny")
    before = held_out_brightness(backend, SIZE)
    seen = {}

    def on_step(step, trainer):
        state = adapter_state(trainer.denoiser)
        seen.setdefault("first", {k: v.clone() for k, v in state.items()})
        seen["last"] = {k: v.clone() for k, v in state.items()}

    train_scst(config(prompts, tmp_path / "out", baseline=baseline), backend=backend, on_step=on_step)
    backend.denoiser.eval()
    after = held_out_brightness(backend, SIZE)
    assert after > before + 0.02, (before, after)
    assert any(not torch.equal(seen["first"][k], seen["last"][k]) for k in seen["first"])
    metrics = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert list(metrics.step) == list(range(1, 11))


def test_ppo_epochs_take_several_optimizer_steps_per_round_with_kl(prompts, tmp_path):
    train_scst(config(prompts, tmp_path / "out", max_steps=3, ppo_epochs=2, kl_beta=0.1, train_fraction=0.5))
    metrics = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert list(metrics.step) == [1, 2, 3]
    assert metrics.reward[0] == metrics.reward[1]  # steps 1 and 2 share the first round's rollouts
    assert (tmp_path / "out" / "checkpoints" / "step-3" / "pytorch_lora_weights.safetensors").is_file()


def test_scst_cli_refuses_a_deterministic_noise_level(cli, prompts, tmp_path):
    code, _, err = cli("train-scst", "--prompts", prompts, "--out", tmp_path / "o", "--noise-level", 0)
    assert code == 2 and "--noise-level" in err
