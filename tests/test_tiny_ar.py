"""The built-in autoregressive ``tiny-ar`` model: its segment codec, sampling past the training length with
per-segment drift rates in eval, training on its own rollouts (SCST, DPO), and refusals of mismatched inputs."""

from __future__ import annotations

import math
from dataclasses import replace

import pandas as pd
import pytest
import torch
from conftest import held_out_brightness

from vpotool.errors import VpoError
from vpotool.models import load_backend
from vpotool.training.config import ScstConfig
from vpotool.training.scst import collect, train_scst

SIZE = dict(frames=33, height=16, width=16, steps=3, guidance=1.0)  # two 17-frame segments: two chunks
FAST_AR = ["--model", "tiny-ar", "--height", "16", "--width", "16", "--steps", "2", "--device", "cpu"]
PROMPTS = (
    "a red circle moving left quickly on a black background\na blue square moving up slowly on a gray background\n"
)


@pytest.fixture(scope="module")
def backend():
    return load_backend("tiny-ar")


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text(PROMPTS)
    return p


def test_segment_codec_codes_each_17_frame_segment_alone(backend):
    codec = backend.codec
    video = torch.rand(1, 33, 3, 32, 32)
    z = codec.encode(video)
    assert z.shape == (1, 16, 10, 8, 8) and backend.latent_shape(65, 32, 32) == (16, 20, 8, 8)
    torch.testing.assert_close(z[:, :, 5:], codec.inner.encode(video[:, 16:33]))
    frames = codec.decode(z)
    assert frames.shape == (1, 33, 3, 32, 32)
    torch.testing.assert_close(frames[:, 17:], codec.inner.decode(z[:, :, 5:])[:, 1:])
    with pytest.raises(VpoError, match="16k \\+ 1 frames"):
        backend.latent_shape(21, 32, 32)


def test_the_same_seed_at_more_frames_extends_the_video(backend):
    from families import prefix_chunks_equal

    assert prefix_chunks_equal(backend, 33, 49, 16, 16) == 10  # two segments, then a third


def test_sample_four_times_the_training_length_and_eval_drift(cli, prompts, tmp_path):
    code, _, err = cli("sample", "--prompts", prompts, "--candidates", 1, "--frames", 65, "--out", tmp_path / "s",
                       *FAST_AR)  # fmt: skip
    assert code == 0, err
    samples = pd.read_parquet(tmp_path / "s" / "samples.parquet")
    assert list(samples.frames) == [65, 65]
    from vpotool.video import read_video

    assert read_video(tmp_path / "s" / samples.video[0]).shape[0] == 65
    code, _, err = cli("eval", "--prompts", prompts, "--frames", 65, "--seeds", 1, "--reward", "world",
                       "--out", tmp_path / "e", *FAST_AR)  # fmt: skip
    assert code == 0, err
    ev = pd.read_parquet(tmp_path / "e" / "eval.parquet").set_index("metric")
    for k in range(1, 5):
        assert f"world.rate.shape_present.seg{k}" in ev.index
    drift = ev.loc["world.drift.shape_present", "mean"]
    curve = [ev.loc[f"world.rate.shape_present.seg{k}", "mean"] for k in range(1, 5)]
    expected = sum((k - 1.5) * (v - sum(curve) / 4) for k, v in enumerate(curve)) / 5.0
    assert math.isclose(drift, expected, abs_tol=1e-9)


def test_frames_that_are_not_whole_chunks_are_refused_before_work(cli, prompts, tmp_path):
    code, _, err = cli("sample", "--prompts", prompts, "--frames", 21, "--out", tmp_path / "s", *FAST_AR)
    assert code == 2 and "16k + 1 frames" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s" / "samples.parquet").exists()


def test_recomputed_rollout_logps_match_and_the_baseline_is_greedy(backend, tmp_path):
    from vpotool.rewards import load_reward
    from vpotool.rollout import rollout_step_logp

    cfg = ScstConfig(prompts="x", out=str(tmp_path), reward="brightness", baseline="greedy", estimator="logp", **SIZE)
    texts = ["a red circle moving left quickly on a black background"] * 2
    ro = collect(backend, load_reward("brightness"), texts, [1, 2], {**SIZE, "fps": 8}, cfg)
    assert ro.logps.shape == (2, 2 * 3) and len(ro.states) == 4  # two chunks of three steps
    sched = backend.schedule(3)
    for j in range(6):
        args = (sched, j, ro.states, ro.latents, ro.cond, ro.uncond, 1.0, cfg.noise_level)
        logp, _, _ = rollout_step_logp(backend, backend.chunking, *args)
        torch.testing.assert_close(logp, ro.logps[:, j], atol=1e-5, rtol=1e-5)


def test_scst_on_its_own_rollouts_raises_held_out_reward(tmp_path):
    from vpotool.training.lora import adapter_state

    b = load_backend("tiny-ar")
    size = {**SIZE, "noise_level": 0.0}
    before = held_out_brightness(b, size)
    seen = {}

    def on_step(step, trainer):
        state = adapter_state(trainer.denoiser)
        seen.setdefault("first", {k: v.clone() for k, v in state.items()})
        seen["last"] = {k: v.clone() for k, v in state.items()}

    prompts = tmp_path / "train.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\n")  # as tests/test_train_scst.py
    opts = dict(
        max_steps=10, lr=1e-2, batch_size=2, lora_rank=4, normalize=True, device="cpu", estimator="logp", **SIZE
    )
    cfg = ScstConfig(prompts=str(prompts), out=str(tmp_path / "o"), reward="brightness", baseline="greedy", **opts)
    train_scst(cfg, backend=b, on_step=on_step)
    b.denoiser.eval()
    after = held_out_brightness(b, size)
    assert after > before + 0.02, (before, after)
    assert any(not torch.equal(seen["first"][k], seen["last"][k]) for k in seen["first"])


def test_dpo_on_rollout_pairs_and_the_bidirectional_refusal(cli, prompts, tmp_path):
    run = tmp_path / "r"
    code, _, err = cli("sample", "--prompts", prompts, "--candidates", 2, "--frames", 33, "--out", run, *FAST_AR)
    assert code == 0, err
    assert (
        cli("score", "--samples", run / "samples.parquet", "--reward", "world", "--out", run / "scores.parquet")[0]
        == 0
    )
    code, _, err = cli("pair", "--samples", run / "samples.parquet", "--scores", run / "scores.parquet",
                       "--out", run / "pairs.parquet", "--min-margin", 0)  # fmt: skip
    assert code == 0, err
    code, _, err = cli("train-dpo", "--pairs", run / "pairs.parquet", "--out", tmp_path / "dpo", "--max-steps", 3,
                       "--lr", "1e-2", "--batch-size", 2, "--model", "tiny-ar", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    metrics = pd.read_parquet(tmp_path / "dpo" / "metrics.parquet")
    assert math.isclose(metrics.loss[0], math.log(2), abs_tol=1e-4)  # policy == reference at the start
    assert metrics.loss.iloc[-1] < metrics.loss[0]
    code, _, err = cli("train-dpo", "--pairs", run / "pairs.parquet", "--out", tmp_path / "bi", "--max-steps", 1,
                       "--model", "tiny", "--device", "cpu")  # fmt: skip
    assert code == 2 and "autoregressive" in err and "bidirectional" in err, err


def test_refl_through_its_own_rollouts_raises_held_out_reward(tmp_path):
    from vpotool.training.config import ReflConfig
    from vpotool.training.lora import adapter_state
    from vpotool.training.refl import train_refl

    b = load_backend("tiny-ar")
    size = {**SIZE, "noise_level": 0.0}
    before = held_out_brightness(b, size)
    prompts = tmp_path / "train.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\n")
    seen = {}

    def on_step(step, trainer):
        seen.setdefault("first", {k: v.clone() for k, v in adapter_state(trainer.denoiser).items()})
        seen["last"] = {k: v.clone() for k, v in adapter_state(trainer.denoiser).items()}

    cfg = ReflConfig(prompts=str(prompts), out=str(tmp_path / "o"), reward="brightness", max_steps=6, lr=1e-2,
                     batch_size=2, lora_rank=4, device="cpu", backprop_steps=1, **SIZE)  # fmt: skip
    train_refl(cfg, backend=b, on_step=on_step)
    b.denoiser.eval()
    after = held_out_brightness(b, size)
    assert after > before + 0.02, (before, after)
    assert any(not torch.equal(seen["first"][k], seen["last"][k]) for k in seen["first"])
    with pytest.raises(VpoError, match="backprop-mode last"):
        train_refl(replace(cfg, out=str(tmp_path / "r"), backprop_mode="random"), backend=load_backend("tiny-ar"))


def test_loop_trains_scst_on_stored_rollouts(cli, prompts, tmp_path):
    """The loop's SCST trains offline on the iteration's stored rollouts: chunks x steps log-probabilities each."""
    code, _, err = cli("loop", "--algo", "scst", "--frames", 33, "--iterations", 1, "--prompts", prompts,
                       "--prompts-per-iter", 2, "--candidates", 2, "--steps-per-iter", 2, "--eval-prompts", prompts,
                       "--eval-seeds", 1, "--out", tmp_path / "loop", *FAST_AR)  # fmt: skip
    assert code == 0, err
    metrics = pd.read_parquet(tmp_path / "loop" / "metrics.parquet")
    assert len(metrics) == 2 and metrics.loss.notna().all()


def test_chunk_advantage_credits_each_chunk_with_the_advantage_to_go():
    from vpotool.losses import chunk_advantage

    r = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 1.0], [0.0, 3.0, 0.0]])
    # d = [1, 0, 1] and [0, -3, 0]; A_k = mean of d_k .. d_2
    want = torch.tensor([[2 / 3, 1 / 2, 1.0], [-1.0, -3 / 2, 0.0]])
    assert torch.allclose(chunk_advantage(r, b), want)
    # beside the teacher's context a chunk shapes no later one: its own r_k - b_k
    assert torch.equal(chunk_advantage(r, b, to_go=False), torch.tensor([[1.0, 0.0, 1.0], [0.0, -3.0, 0.0]]))


def test_chunk_frames_are_the_world_segments(backend):
    from vpotool.rollout import chunk_frames
    from vpotool.world.long import segment_bounds

    lat = backend.latent_shape(65, 32, 32)[1]
    assert chunk_frames(backend, backend.chunking, lat) == segment_bounds(65)


WORLD_PROMPTS = (
    "a red circle moving left slowly on a black background\na blue square moving up quickly on a gray background\n"
)


def test_teacher_context_rolls_out_beside_the_rendered_clip(backend):
    from vpotool.rewards import load_reward
    from vpotool.sampling import resolved_settings
    from vpotool.training.scst import teacher_latents

    prompts = WORLD_PROMPTS.split("\n")[:2]
    cfg = ScstConfig(prompts="x.txt", out="o", reward="world", device="cpu", noise_level=0.7, estimator="logp", **SIZE)
    settings = resolved_settings(cfg, backend)
    reward = load_reward("world", device="cpu")
    own = collect(backend, reward, prompts, [3, 4], settings, cfg)
    forced = collect(backend, reward, prompts, [3, 4], settings, replace(cfg, context="teacher", advantage="chunk"))
    truth = teacher_latents(backend, prompts, [303, 404], settings)  # collect's seeds: s * 101 for one sample each
    assert torch.equal(forced.latents, truth) and forced.advantage.shape == (2, 2)
    # the first chunk has no context either way; the second sees the rendered clip instead of the model's own
    first, second = slice(0, 5), slice(5, 10)
    assert torch.allclose(own.states[-1][:, :, first], forced.states[-1][:, :, first])
    assert not torch.allclose(own.states[-1][:, :, second], forced.states[-1][:, :, second], atol=1e-3)


def test_scst_per_chunk_on_teacher_context_raises_its_objective(tmp_path, monkeypatch):
    """One update on teacher-forced rollouts with per-chunk advantages (each chunk's own, not the reward to go)
    raises sum_k A_k * logp(chunk k's steps) under the new weights: each chunk's steps move the way their own
    advantage says."""
    import vpotool.training.scst as scst_module
    from vpotool.losses import chunk_advantage
    from vpotool.rewards import load_reward
    from vpotool.rollout import rollout_step_logp
    from vpotool.sampling import resolved_settings
    from vpotool.training.common import setup
    from vpotool.training.scst import scst_update

    b = load_backend("tiny-ar")
    prompts = tmp_path / "train.txt"
    prompts.write_text(WORLD_PROMPTS)
    cfg = ScstConfig(prompts=str(prompts), out=str(tmp_path / "o"), reward="world", advantage="chunk",
                     context="teacher", lr=1e-3, lora_rank=4, max_steps=1, device="cpu", estimator="logp",
                     **SIZE)  # fmt: skip
    trainer = setup(cfg, b)
    settings = resolved_settings(cfg, b)
    to_go = []
    monkeypatch.setattr(
        scst_module, "chunk_advantage", lambda r, b_, go: to_go.append(go) or chunk_advantage(r, b_, go)
    )
    ro = collect(b, load_reward("world", device="cpu"), WORLD_PROMPTS.split("\n")[:2], [5, 6], settings, cfg)
    assert to_go == [False]
    assert ro.advantage.shape == (2, 2) and ro.advantage.abs().min() > 0
    sched = b.schedule(SIZE["steps"], b.latent_shape(33, 16, 16))
    n = ro.logps.shape[1]

    def objective():
        with torch.no_grad():
            args = (ro.states, ro.latents, ro.cond, None, 1.0, cfg.noise_level)
            logps = [rollout_step_logp(b, b.chunking, sched, j, *args)[0] for j in range(n)]
        return sum((ro.advantage[:, j // len(sched)] * logps[j]).sum() for j in range(n)).item()

    before = objective()
    scst_update(trainer, cfg, [(ro, list(range(n)))], sched, settings, clipped=False)
    assert objective() > before


def test_chunk_options_are_refused_where_they_mean_nothing(cli, tmp_path):
    p = tmp_path / "p.txt"
    p.write_text(WORLD_PROMPTS)
    base = ["train-scst", "--prompts", p, "--out", tmp_path / "o", "--max-steps", 1, "--device", "cpu"]
    code, _, err = cli(*base, "--model", "tiny", "--advantage", "chunk")
    assert code == 2 and "needs an autoregressive model" in err and not (tmp_path / "o" / "checkpoints").exists()
    code, _, err = cli(*base, *FAST_AR, "--advantage", "chunk", "--baseline", "group-mean")
    assert code == 2 and "--baseline greedy" in err
    other = tmp_path / "other.txt"
    other.write_text("a cat on a sofa\n")
    code, _, err = cli(*base[:2], other, *base[3:], *FAST_AR, "--frames", 33, "--context", "teacher")
    assert code == 2 and "--context teacher needs a ground-truth clip" in err
    code, _, err = cli("train-scst", "--samples", "s.parquet", "--scores", "c.parquet", "--out", tmp_path / "x",
                       "--context", "teacher")  # fmt: skip
    assert code == 2 and "--context teacher needs rollouts sampled now" in err


def test_init_adapter_starts_from_another_run_and_refuses_another_rank(tmp_path):
    from safetensors.torch import load_file

    from vpotool.training.lora import adapter_state

    b = load_backend("tiny-ar")
    prompts = tmp_path / "train.txt"
    prompts.write_text(WORLD_PROMPTS)
    opts = dict(prompts=str(prompts), reward="brightness", batch_size=1, lora_rank=4, device="cpu", **SIZE)
    first = train_scst(ScstConfig(out=str(tmp_path / "a"), max_steps=1, lr=1e-2, **opts), backend=b)
    seen = {}
    ckpt = str(first / "checkpoints" / "step-1")
    b2 = load_backend("tiny-ar")

    def on_step(step, trainer):
        seen["state"] = {k: v.clone() for k, v in adapter_state(trainer.denoiser).items()}

    # lr so small the second run's one step leaves the weights where they started
    cfg = ScstConfig(out=str(tmp_path / "b"), max_steps=1, lr=1e-12, init_adapter=ckpt, **opts)
    train_scst(cfg, backend=b2, on_step=on_step)
    saved = {
        k.removeprefix("transformer."): v for k, v in load_file(f"{ckpt}/pytorch_lora_weights.safetensors").items()
    }
    assert saved.keys() == seen["state"].keys()
    assert all(torch.allclose(saved[k], seen["state"][k], atol=1e-6) for k in saved)
    assert any(saved[k].abs().max() > 0 for k in saved if "lora_B" in k)  # not a fresh (zero) adapter
    with pytest.raises(VpoError, match="has LoRA rank 4 .* pass --lora-rank 4"):
        train_scst(replace(cfg, out=str(tmp_path / "c"), lora_rank=8), backend=load_backend("tiny-ar"))
