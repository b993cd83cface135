"""train-scst --estimator logp on the tiny model: recomputed log-probabilities match the rollout's, held-out
reward rises with both baselines, PPO epochs count as optimizer steps, and advantages carry the SCST sign.
Offline, on stored trajectories: training favours the above-baseline ones, and unusable input is refused in one
line."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import TRAIN_PROMPTS, held_out_brightness, one_line_error, scored_fps

from vpotool.manifest import write_manifest
from vpotool.training.batches import load_batch, load_rollouts
from vpotool.training.config import ScstConfig
from vpotool.training.scst import collect, train_scst

SIZE = dict(frames=5, height=16, width=16, steps=4, guidance=1.0)


def config(prompts, out, **kw) -> ScstConfig:
    base = dict(prompts=str(prompts), out=str(out), reward="brightness", max_steps=10, lr=5e-2, batch_size=2)
    return ScstConfig(
        **{**base, **SIZE, "lora_rank": 4, "normalize": True, "device": "cpu", "estimator": "logp", **kw}
    )


def test_recomputed_step_logps_match_the_rollout(prompts, tmp_path):
    from vpotool.models import load_backend
    from vpotool.rewards import load_reward
    from vpotool.sampling import step_logp

    b = load_backend("tiny")
    cfg = config(prompts, tmp_path / "o", baseline="greedy")
    settings = {**SIZE, "fps": 8}
    ro = collect(b, load_reward("brightness"), ["a red dot", "a blue dot"], [1, 2], settings, cfg)
    assert ro.logps.shape == (2, 4) and len(ro.states) == 5
    torch.testing.assert_close(
        ro.advantage, (ro.reward - ro.baseline) / ((ro.reward - ro.baseline).pow(2).mean().sqrt() + 1e-4)
    )
    sched = b.schedule(4, b.latent_shape(5, 16, 16))
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
    assert after > before + 0.015, (before, after)  # 10 noisy REINFORCE steps: +0.02 to +0.03
    assert any(not torch.equal(seen["first"][k], seen["last"][k]) for k in seen["first"])
    metrics = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert list(metrics.step) == list(range(1, 11))


def test_ppo_epochs_take_several_optimizer_steps_per_round_with_kl(prompts, tmp_path):
    train_scst(config(prompts, tmp_path / "out", max_steps=3, ppo_epochs=2, kl_beta=0.1, train_fraction=0.5))
    metrics = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert list(metrics.step) == [1, 2, 3]
    assert metrics.reward[0] == metrics.reward[1]  # steps 1 and 2 share the first round's rollouts
    assert (tmp_path / "out" / "checkpoints" / "step-3" / "pytorch_lora_weights.safetensors").is_file()


def test_scst_rewards_rollouts_at_the_fps_score_uses(prompts, tmp_path, fps_seen):
    """A reward that takes fps (raft's VBench frame stride) sees the videos' fps in training, as in ``score``."""
    train_scst(config(prompts, tmp_path / "out", reward="fps-seen", max_steps=1))
    trained = set(fps_seen)
    assert trained == scored_fps(fps_seen, prompts, tmp_path / "run", SIZE) == {8}  # the tiny model's fps


def test_scst_cli_refuses_a_deterministic_noise_level(cli, prompts, tmp_path):
    code, _, err = cli("train-scst", "--prompts", prompts, "--out", tmp_path / "o", "--noise-level", 0)
    assert code == 2 and "--noise-level" in err


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A run folder with 2 prompts x 4 stored trajectories of the tiny model (noise level 0.7), scored by
    brightness; tests read it and write elsewhere."""
    from vpotool.config import SampleConfig, ScoreConfig
    from vpotool.stages.sample import run_sample
    from vpotool.stages.score import run_score

    run = tmp_path_factory.mktemp("stored")
    (run / "train.txt").write_text(TRAIN_PROMPTS)
    kw = dict(prompts=str(run / "train.txt"), out=str(run), noise_level=0.7, device="cpu", **SIZE)
    run_sample(SampleConfig(**kw, candidates=4, save_trajectory=True))
    run_score(ScoreConfig(samples=str(run / "samples.parquet"), out=str(run / "scores.parquet"), reward="brightness"))
    return run


def offline_config(run, out, **kw) -> ScstConfig:
    base = dict(samples=str(run / "samples.parquet"), scores=str(run / "scores.parquet"), out=str(out), lr=1e-2)
    base.update(max_steps=6, batch_size=4, lora_rank=4, device="cpu", estimator="logp")
    return ScstConfig(**{**base, **kw})


def stored_log_ratio(backend, data, cfg) -> torch.Tensor:
    """``sum_t (logp_now - logp_stored)`` of every stored trajectory under the backend's weights now -> ``[N]``."""
    from vpotool.sampling import step_logp

    ro = load_batch(backend, data, list(range(len(data.files))), cfg)
    sched = backend.schedule(SIZE["steps"], data.shape)
    with torch.no_grad():
        now = [
            step_logp(backend, sched, i, ro.states[i], ro.states[i + 1], ro.cond, ro.uncond, 1.0, 0.7)[0]
            for i in range(SIZE["steps"])
        ]
    return (torch.stack(now, 1) - ro.logps).sum(1)


def test_offline_scst_favours_the_above_baseline_trajectories(stored, tmp_path):
    from vpotool.models import load_backend
    from vpotool.training.lora import adapter_state

    backend = load_backend("tiny")
    cfg = offline_config(stored, tmp_path / "out")
    data = load_rollouts(cfg.samples, cfg.scores, cfg)
    assert len(data.files) == 8 and data.shape == (16, 2, 4, 4)
    assert torch.allclose(data.baseline[:4], data.reward[:4].mean()) and (data.reward != data.baseline).all()
    seen = {}

    def on_step(step, trainer):
        state = {k: v.clone() for k, v in adapter_state(trainer.denoiser).items()}
        seen.setdefault("first", state)
        seen["last"] = state

    train_scst(cfg, backend=backend, on_step=on_step)
    backend.denoiser.eval()
    ratio = stored_log_ratio(backend, data, cfg)
    above, below = ratio[data.reward > data.baseline].mean(), ratio[data.reward < data.baseline].mean()
    assert above > below + 1e-3, (above, below)  # the policy moved towards the brighter trajectories of each prompt
    assert any(not torch.equal(seen["first"][k], seen["last"][k]) for k in seen["first"])
    assert list(pd.read_parquet(tmp_path / "out" / "metrics.parquet").step) == list(range(1, 7))
    resolved = (tmp_path / "out" / "train-scst.yaml").read_text()
    assert "reward: brightness" in resolved and "noise_level: 0.7" in resolved and "baseline: group-mean" in resolved


def test_offline_scst_warns_about_ignored_flags_and_skipped_prompts(cli, stored, tmp_path):
    table = pd.read_parquet(stored / "scores.parquet")
    partial = table[(table.prompt_id == "p00000") | (table.sample_id == "p00001-c00")]
    write_manifest(tmp_path / "partial.parquet", partial.to_dict("records"), "scores")
    args = ("--samples", stored / "samples.parquet", "--scores", tmp_path / "partial.parquet", "--out", tmp_path / "o")
    code, _, err = cli(
        "train-scst",
        *args,
        "--steps",
        9,
        "--max-steps",
        1,
        "--batch-size",
        2,
        "--device",
        "cpu",
        "--estimator",
        "logp",
    )
    assert code == 0, err
    assert "warning: --steps 9 is ignored" in err and "sampled with steps 4" in err
    assert "skipping 1 prompt(s) with fewer than 2 scored candidates: p00001" in err
    assert "steps: 4" in (tmp_path / "o" / "train-scst.yaml").read_text()


def test_offline_scst_refuses_unusable_rollouts_in_one_line(cli, stored, tmp_path):
    from vpotool.config import SampleConfig
    from vpotool.stages.sample import run_sample

    samples, scores, out = stored / "samples.parquet", stored / "scores.parquet", tmp_path / "o"

    def train(*args, samples=samples, scores=scores):
        return cli("train-scst", "--samples", samples, "--scores", scores, "--out", out, "--device", "cpu", *args)

    one_line_error(cli("train-scst", "--out", out), "--prompts", "--samples")
    one_line_error(cli("train-scst", "--samples", samples, "--out", out), "--scores")
    one_line_error(train("--baseline", "greedy"), "--baseline", "group-mean")
    one_line_error(train("--model", "cogvideox"), "--model", "cogvideox", "tiny")
    one_line_error(train("--reward-dimension", "vibes"), "--reward-dimension", "brightness")

    table = pd.read_parquet(scores)
    variants = {
        "nan": table.assign(overall=[math.nan, *table.overall[1:]]),
        "two-rewards": pd.concat([table, table.assign(reward="flicker")]),
        "one-each": table.groupby("prompt_id").head(1),
        "first-two": table[table.sample_id.str.endswith(("c00", "c01"))],
    }
    for name, rows in variants.items():
        write_manifest(tmp_path / f"{name}.parquet", rows.to_dict("records"), "scores")
    one_line_error(train(scores=tmp_path / "nan.parquet"), "non-finite", "p00000-c00")
    one_line_error(
        train(scores=tmp_path / "two-rewards.parquet"), "several rewards", "brightness, flicker", "--reward"
    )
    one_line_error(train(scores=tmp_path / "one-each.parquet"), "2 or more scored candidates", "--candidates")

    # Samples stored without their trajectories.
    plain = tmp_path / "plain"
    kw = dict(prompts=str(stored / "train.txt"), out=str(plain), noise_level=0.7, device="cpu", **SIZE)
    run_sample(SampleConfig(**kw, candidates=2))
    one_line_error(
        train("--estimator", "logp", samples=plain / "samples.parquet", scores=tmp_path / "first-two.parquet"),
        "no stored trajectory",
        "--save-trajectory",
        "--noise-level",
    )


def test_step_windows_pick_the_high_noise_steps_or_drop_the_last(prompts, tmp_path):
    from vpotool.training.scst import trained_steps

    cfg = config(prompts, tmp_path / "o", train_fraction=0.5, step_window="high-noise")
    assert trained_steps(8, cfg, 0, 4) == [0, 1, 4, 5]  # two chunks of 4 steps: the first half of each
    cfg = config(prompts, tmp_path / "o", step_window="drop-last")
    assert trained_steps(8, cfg, 0, 4) == [0, 1, 2, 4, 5, 6]
    cfg = config(prompts, tmp_path / "o", train_fraction=0.5)
    picked = trained_steps(8, cfg, 3)
    assert len(picked) == 4 and picked == sorted(set(picked)) and picked == trained_steps(8, cfg, 3)
