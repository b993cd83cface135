"""SkyReels-V2 Diffusion Forcing beyond its synchronous whole-chunk mode, against
``SkyReelsV2DiffusionForcingPipeline`` on tiny random weights: the asynchronous schedule (``ar_step``,
``causal_block_size``), the shorter last window, ``addnoise``, and the one-line refusals of what a chunking cannot
stage."""

from __future__ import annotations

import pytest
import torch
from families import FAMILY_SIZES, make_tiny_checkpoint

from vpotool.diffusion_forcing import stagger
from vpotool.errors import VpoError
from vpotool.models import load_backend
from vpotool.models.base import Chunking
from vpotool.rollout import rollout

PROMPTS = ["a red circle moving left", "a blue square on a black background"]
# a 6-latent-frame window whose later windows add 4 frames beside 2: blocks of 1 or 2 frames divide all three
WINDOW = {"base_frames": 21, "overlap_frames": 5}


@pytest.fixture(scope="module")
def skyreels_path(tmp_path_factory):
    return make_tiny_checkpoint("skyreels", tmp_path_factory.mktemp("skyreels"))


def test_stagger_by_hand_and_as_the_pipeline_builds_it():
    """Three blocks, two steps, each block one step behind the one before: four iterations (by hand), and the
    pipeline's ``generate_timestep_matrix`` (context blocks pre-ready) for other settings."""
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    index, update = stagger(3, 2, 1)
    assert index.tolist() == [[1, 0, 0], [2, 1, 0], [3, 2, 1], [3, 3, 2]]
    assert update.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert stagger(4, 3, 0)[0].tolist() == [[1] * 4, [2] * 4, [3] * 4]  # synchronous
    grid = torch.tensor([999, 800, 500, 200])
    for frames, ready, steps, ar_step, size in [(6, 2, 4, 2, 1), (6, 2, 4, 2, 2), (10, 4, 3, 3, 2), (4, 2, 3, 5, 2)]:
        _, ref_index, ref_update, _ = SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix(
            None, frames, grid[:steps], frames, ar_step, ready, size
        )
        index, update = stagger((frames - ready) // size, steps, ar_step)
        n = ready // size
        index = torch.cat([torch.full((len(index), n), steps + 1), index], 1).repeat_interleave(size, 1)
        update = torch.cat([torch.zeros((len(update), n), dtype=torch.bool), update], 1).repeat_interleave(size, 1)
        assert torch.equal(index, ref_index) and torch.equal(update, ref_update)


def test_short_windows_and_what_manifests_record():
    """A skyreels chunking ends a video with a shorter window (one window below ``first``); lengths that are not
    whole causal blocks are refused naming valid ones. The asynchronous fields are recorded only when on."""
    c = Chunking(first=3, chunk=2, context=1, short_last=True)
    assert c.spans(6) == [(0, 3), (3, 5), (5, 6)] and c.spans(2) == [(0, 2)] and c.spans(7) == [(0, 3), (3, 5), (5, 7)]
    blocks = Chunking(first=4, chunk=2, context=2, ar_step=1, causal_block=2, short_last=True)
    assert blocks.spans(10) == [(0, 4), (4, 6), (6, 8), (8, 10)]
    with pytest.raises(VpoError, match="not whole causal blocks of 2 frames.*5, 13, 21"):
        blocks.spans(7)
    with pytest.raises(VpoError, match="causal blocks that divide"):
        Chunking(first=3, chunk=2, context=1, causal_block=2)
    assert Chunking.from_dict(blocks.as_dict()) == blocks and blocks != Chunking(first=4, chunk=2, context=2)
    assert c.as_dict() == {"first": 3, "chunk": 2, "context": 1, "context_noise": 0.0}  # as before the fields
    assert Chunking.from_dict(c.as_dict()) == c  # short_last is not compared: old manifests still match


def pipeline_noise(spans, context: int, shape, b: int) -> torch.Tensor:
    """The starting noise the pipeline draws from ``manual_seed(0)``: each window whole (a later one's overlap then
    overwritten by the context), as vpotool's rollout takes it, chunk by chunk."""
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn((b, shape[0], spans[0][1], *shape[2:]), generator=gen)]
    for a, e in spans[1:]:
        parts.append(torch.randn((b, shape[0], context + e - a, *shape[2:]), generator=gen)[:, :, context:])
    return torch.cat(parts, 2)


CASES = [
    # (window, frames, ar_step, causal_block_size, guidance, addnoise)
    (WINDOW, 37, 1, 1, 1.0, 0),  # 6 + 4 latent frames
    (WINDOW, 45, 2, 2, 3.0, 0),  # 6 + 4 + a short window of 2
    (WINDOW, 37, 3, 2, 1.0, 20),  # the context re-noised at every iteration
    (WINDOW, 41, 3, 1, 1.0, 0),  # 6 + 4 + 1
    (WINDOW, 13, 2, 1, 1.0, 0),  # shorter than the first window: one window (the pipeline's short video)
    (WINDOW, 45, 0, 2, 1.0, 0),  # synchronous with block-causal attention
    (WINDOW, 41, 0, 0, 3.0, 0),  # synchronous, a short last window
    ({"base_frames": 9, "overlap_frames": 5}, 17, 0, 0, 1.0, 20),  # synchronous with addnoise
]


@pytest.mark.parametrize(("window", "frames", "ar_step", "size", "guidance", "addnoise"), CASES)
def test_rollout_equals_the_pipeline(skyreels_path, window, frames, ar_step, size, guidance, addnoise):
    """vpotool's rollout with the checkpoint's UniPC scheduler gives the pipeline's latents, same weights, noise
    and prompt embeddings. The pipeline re-noises the context (``addnoise_condition``) from the global generator:
    both runs start it from the same seed."""
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    _, height, width = FAMILY_SIZES["skyreels"]
    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(skyreels_path)  # its own: causal blocks stay set
    options = {**window, "addnoise": addnoise, "ar_step": ar_step, "causal_block_size": size}
    backend = load_backend("skyreels", skyreels_path, options=options)
    ch = backend.chunking
    assert (ch.ar_step, ch.causal_block) == (ar_step, size or 1)
    shape = backend.latent_shape(frames, height, width)
    b = len(PROMPTS)
    cond = backend.encode_prompts(PROMPTS)
    uncond = backend.encode_negative(b) if guidance != 1.0 else None
    torch.manual_seed(1)
    ref = pipe(
        None, prompt_embeds=cond["encoder_hidden_states"],
        negative_prompt_embeds=None if uncond is None else uncond["encoder_hidden_states"],
        height=height, width=width, num_frames=frames, num_inference_steps=4, guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0), output_type="latent", overlap_history=window["overlap_frames"],
        base_num_frames=window["base_frames"], addnoise_condition=addnoise, fps=24, ar_step=ar_step,
        causal_block_size=size or None,
    ).frames  # fmt: skip

    noise = pipeline_noise(ch.spans(shape[1]), ch.context, shape, b)
    torch.manual_seed(1)
    ours = rollout(
        backend, cond, noise, chunking=ch, steps=4, guidance=guidance, uncond=uncond,
        scheduler=backend.pipeline_scheduler,
    ).latents  # fmt: skip
    assert ref.shape == ours.shape
    torch.testing.assert_close(ours, ref.float(), atol=2e-4, rtol=1e-3)


def test_staggered_schedule_changes_the_video_and_euler_samples_it(skyreels_path):
    """The asynchronous mode is not the synchronous one in disguise (later blocks see cleaner earlier ones), and
    vpotool's own deterministic sampler runs it too, beside a teacher's context as well; stochastic rollouts are
    refused in one line."""
    _, height, width = FAMILY_SIZES["skyreels"]
    runs = {}
    for ar_step in (0, 2):
        backend = load_backend("skyreels", skyreels_path, options={**WINDOW, "ar_step": ar_step})
        shape = backend.latent_shape(37, height, width)
        noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
        cond = backend.encode_prompts(PROMPTS[:1])
        runs[ar_step] = rollout(backend, cond, noise, chunking=backend.chunking, steps=3).latents
        assert torch.isfinite(runs[ar_step]).all()
    assert (runs[2] - runs[0]).abs().max() > 1e-2
    # beside its own video as the teacher's context, the rollout makes that video again
    again = rollout(backend, cond, noise, chunking=backend.chunking, steps=3, teacher=runs[2]).latents
    torch.testing.assert_close(again, runs[2], atol=1e-6, rtol=0)
    with pytest.raises(VpoError, match="ar_step=2.*deterministically"):
        rollout(backend, cond, noise, chunking=backend.chunking, steps=3, noise_level=0.5)
    assert backend.chunking.as_dict()["ar_step"] == 2  # manifests record the schedule
    assert "ar_step" not in load_backend("skyreels", skyreels_path, options=WINDOW).chunking.as_dict()


def refused(result, *words) -> str:
    code, _, err = result
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-3000:]
    for w in words:
        assert w in err, err
    return err.strip()


@pytest.mark.parametrize(
    ("model", "options", "frames", "words"),
    [
        ("skyreels", "base_frames=21,overlap_frames=5,causal_block_size=4", "21", ["causal_block_size=4", "divisor"]),
        ("skyreels", "base_frames=21,overlap_frames=9,causal_block_size=2", "21", ["causal_block_size=2", "3"]),
        ("skyreels", "base_frames=21,overlap_frames=5,ar_step=-1", "21", ["ar_step=-1"]),
        (
            "skyreels",
            "base_frames=13,overlap_frames=5,ar_step=2,causal_block_size=2",
            "13",
            ["ar_step=2", "ar_step=0"],
        ),
        ("skyreels", "base_frames=21,overlap_frames=5,causal_block_size=2", "41", ["--frames 41", "causal blocks"]),
        ("tiny-ar", "ar_step=1,causal_block_size=5", "17", ["ar_step=1", "one block"]),
        ("tiny-ar", "causal_block_size=2", "17", ["causal_block_size=2", "divisor of 5"]),
    ],
)
def test_what_a_chunking_cannot_stage_is_one_line(cli, skyreels_path, tmp_path, model, options, frames, words):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    out = tmp_path / "out"
    path = ["--model-path", skyreels_path] if model == "skyreels" else []
    flags = ["--frames", frames, "--height", "16", "--width", "16", "--steps", "2", "--device", "cpu"]
    refused(
        cli("sample", "--prompts", prompts, "--out", out, "--model", model, *path, "--model-options", options, *flags),
        *words,
    )
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not written, written


@pytest.mark.parametrize("stage", ["train-scst", "train-refl"])
def test_trainers_refuse_the_asynchronous_mode_in_one_line(cli, tmp_path, stage):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    out = tmp_path / "out"
    flags = ["--model", "tiny-ar", "--model-options", "ar_step=1", "--height", "16", "--width", "16", "--steps", "2"]
    refused(
        cli(stage, "--prompts", prompts, "--out", out, *flags, "--max-steps", "1", "--device", "cpu"),
        "ar_step=1",
        "train with ar_step=0",
    )
    assert not (out / "checkpoints").exists() and not (out / "metrics.parquet").exists()
