"""Forward-process policy optimisation in train-scst (``--estimator nft`` / ``awm``) on the tiny models: the
held-out reward rises where the advantage's sign is known (online, every baseline), the denoising error falls on
the stored videos above their prompt's baseline and rises below it (offline, from final latents alone), a resumed
run equals an uninterrupted one, an autoregressive model trains per chunk, and unusable input is refused in one
line."""

from __future__ import annotations

import pytest
import torch
from conftest import TRAIN_PROMPTS, held_out_brightness, one_line_error

from vpotool.training.batches import load_rollouts
from vpotool.training.config import ScstConfig
from vpotool.training.scst import train_scst

SIZE = dict(frames=5, height=16, width=16, steps=4, guidance=1.0)


def config(prompts, out, **kw) -> ScstConfig:
    base = dict(prompts=str(prompts), out=str(out), reward="brightness", max_steps=8, lr=5e-2, batch_size=2)
    return ScstConfig(**{**base, **SIZE, "lora_rank": 4, "device": "cpu", "group_size": 3, **kw})


def adapter_snapshot(seen):
    from vpotool.training.lora import adapter_state

    def on_step(step, trainer):
        state = {k: v.clone() for k, v in adapter_state(trainer.denoiser).items()}
        seen.setdefault("first", state)
        seen["last"] = state

    return on_step


@pytest.mark.parametrize("estimator,baseline", [("nft", "group-mean"), ("awm", "leave-one-out"), ("nft", "greedy")])
def test_forward_estimators_raise_held_out_reward_and_change_the_adapter(prompts, tmp_path, estimator, baseline):
    from vpotool.models import load_backend

    backend = load_backend("tiny")
    before = held_out_brightness(backend, SIZE)
    seen = {}
    cfg = config(prompts, tmp_path / "out", estimator=estimator, baseline=baseline)
    assert cfg.noise_level == (0.7 if baseline == "greedy" else 0.0)  # the ODE, unless greedy needs a stochastic one
    train_scst(cfg, backend=backend, on_step=adapter_snapshot(seen))
    backend.denoiser.eval()
    after = held_out_brightness(backend, SIZE)
    assert after > before + 0.02, (before, after)
    assert any(not torch.equal(seen["first"][k], seen["last"][k]) for k in seen["first"])


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """2 prompts x 4 deterministic samples of the tiny model (no trajectories), scored by brightness."""
    from vpotool.config import SampleConfig, ScoreConfig
    from vpotool.stages.sample import run_sample
    from vpotool.stages.score import run_score

    run = tmp_path_factory.mktemp("stored")
    (run / "train.txt").write_text(TRAIN_PROMPTS)
    run_sample(SampleConfig(prompts=str(run / "train.txt"), out=str(run), device="cpu", candidates=4, **SIZE))
    run_score(ScoreConfig(samples=str(run / "samples.parquet"), out=str(run / "scores.parquet"), reward="brightness"))
    return run


def offline_config(run, out, **kw) -> ScstConfig:
    base = dict(samples=str(run / "samples.parquet"), scores=str(run / "scores.parquet"), out=str(out), lr=2e-3)
    return ScstConfig(**{**base, "max_steps": 6, "batch_size": 2, "lora_rank": 4, "device": "cpu", **kw})


def denoising_errors(backend, data) -> torch.Tensor:
    """Each stored video's flow-matching error under the backend's weights now, averaged over fixed draws -> [N]."""
    from vpotool.latents import load_latents
    from vpotool.losses import per_sample_mse
    from vpotool.rollout import noised_input

    x0 = load_latents(data.files)
    cond = backend.condition(data.prompts)
    errs = []
    with torch.no_grad():
        for d in range(8):
            inp = noised_input(backend, [x0], [1000 + d * 50 + j for j in range(len(x0))])
            errs.append(per_sample_mse(backend.predict(inp.x_in, inp.t, cond), inp.target))
    return torch.stack(errs).mean(0)


@pytest.mark.parametrize("estimator", ["nft", "awm"])
def test_offline_forward_estimators_fit_the_above_baseline_videos(stored, tmp_path, estimator):
    from vpotool.models import load_backend

    backend = load_backend("tiny")
    cfg = offline_config(stored, tmp_path / "out", estimator=estimator)
    data = load_rollouts(cfg.samples, cfg.scores, cfg, backend)
    assert data.groups == [[0, 1, 2, 3], [4, 5, 6, 7]] and data.shape == (16, 2, 4, 4)
    before = denoising_errors(backend, data)
    seen = {}
    train_scst(cfg, backend=backend, on_step=adapter_snapshot(seen))
    backend.denoiser.eval()
    change = denoising_errors(backend, data) - before
    above, below = change[data.advantage > 0].mean(), change[data.advantage < 0].mean()
    assert above < below, (above, below)  # the policy moved towards its brighter videos, away from the darker ones
    assert any(not torch.equal(seen["first"][k], seen["last"][k]) for k in seen["first"])
    resolved = (tmp_path / "out" / "train-scst.yaml").read_text()
    assert f"estimator: {estimator}" in resolved and "noise_level: 0.0" in resolved


def test_nft_with_the_sampler_as_old_policy_stays_near_it(stored, tmp_path):
    """Offline, the base model made the samples: --nft-old sampler takes its output as v_old. At the first step the
    fresh adapter is the base model, so both old policies give the same step; after many steps at a large learning
    rate the sampler's trust region keeps the policy nearer the base model than the detached current policy does."""
    from vpotool.models import load_backend

    def run(old, steps, out):
        backend, seen = load_backend("tiny"), {}
        cfg = offline_config(stored, tmp_path / out, estimator="nft", nft_old=old, max_steps=steps, lr=2e-2)
        train_scst(cfg, backend=backend, on_step=adapter_snapshot(seen))
        backend.denoiser.eval()
        return seen, drift(backend, load_rollouts(cfg.samples, cfg.scores, cfg, backend))

    def drift(backend, data):  # mean squared distance of the policy's output from the base model's
        from vpotool.latents import load_latents
        from vpotool.rollout import noised_input
        from vpotool.training.lora import reference_mode

        x0, cond = load_latents(data.files), backend.condition(data.prompts)
        with torch.no_grad():
            inp = noised_input(backend, [x0], list(range(len(x0))))
            out = backend.predict(inp.x_in, inp.t, cond)
            with reference_mode(backend.denoiser, "base"):
                base = backend.predict(inp.x_in, inp.t, cond)
        return (out - base).pow(2).mean().item()

    current, sampler = run("current", 1, "c1")[0], run("sampler", 1, "s1")[0]
    for k in current["first"]:
        torch.testing.assert_close(sampler["first"][k], current["first"][k], rtol=0, atol=0)
    (_, far), (_, near) = run("current", 12, "c12"), run("sampler", 12, "s12")
    assert near < 0.7 * far, (near, far)


def test_a_resumed_forward_run_equals_an_uninterrupted_one(stored, tmp_path):
    from vpotool.training.lora import adapter_state

    def final(out, **kw):
        seen = {}
        train_scst(offline_config(stored, out, save_every=2, **kw), on_step=adapter_snapshot(seen))
        return seen["last"]

    whole = final(tmp_path / "whole", max_steps=4)
    final(tmp_path / "cut", max_steps=2)
    resumed = final(tmp_path / "cut", max_steps=4, resume=True)
    assert whole.keys() == resumed.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=0)
    assert adapter_state  # the snapshots are the trainer's own adapter tensors


def test_an_autoregressive_model_trains_a_chunk_beside_its_own_rollout(tmp_path):
    """tiny-ar at two chunks, per-chunk advantages with the greedy baseline: the step runs and moves the adapter."""
    seen = {}
    (tmp_path / "p.txt").write_text("a red circle moving left\n")
    cfg = ScstConfig(
        prompts=str(tmp_path / "p.txt"), out=str(tmp_path / "out"), model="tiny-ar", reward="brightness",
        frames=33, steps=2, guidance=1.0, max_steps=2, batch_size=1, lora_rank=4, lr=1e-2, device="cpu",
        estimator="nft", baseline="greedy", advantage="chunk",
    )  # fmt: skip
    train_scst(cfg, on_step=adapter_snapshot(seen))
    assert any(not torch.equal(seen["first"][k], seen["last"][k]) for k in seen["first"])


def test_forward_estimators_refuse_unusable_input_in_one_line(cli, stored, prompts, tmp_path):
    import shutil

    out = tmp_path / "o"
    online = ("train-scst", "--prompts", prompts, "--out", out, "--device", "cpu")
    one_line_error(cli(*online, "--estimator", "ppo"), "--estimator", "nft, awm, logp")
    one_line_error(cli(*online, "--baseline", "greedy", "--noise-level", 0), "--noise-level", "greedy")
    one_line_error(cli(*online, "--baseline", "leave-one-out", "--group-size", 1), "--group-size", "at least 2")
    one_line_error(cli(*online, "--baseline", "best"), "--baseline", "leave-one-out")
    one_line_error(cli("loop", "--algo", "scst", "--baseline", "greedy", "--out", out), "--baseline", "group-mean")
    # Scores whose samples lost their latents: the offline path trains on them.
    copy = tmp_path / "copy"
    shutil.copytree(stored, copy)
    next((copy / "latents").glob("*.safetensors")).unlink()
    args = ("--samples", copy / "samples.parquet", "--scores", copy / "scores.parquet", "--out", out)
    one_line_error(cli("train-scst", *args, "--device", "cpu"), "latent file not found")
    assert not out.exists() or not any(out.iterdir())  # the run folder, locked and empty
