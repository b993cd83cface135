"""Autoregressive rollouts: chunking, SkyReels-V2 Diffusion Forcing against its diffusers pipeline on tiny random
weights, the stochastic and greedy rollouts, and memory bounded by the window."""

from __future__ import annotations

import pytest
import torch
from families import FAMILY_SIZES, make_tiny_checkpoint

from vpotool.errors import VpoError
from vpotool.models import load_backend
from vpotool.rollout import Chunking, rollout
from vpotool.sampling import sample, seeded_noise

PROMPTS = ["a red circle moving left", "a blue square on a black background"]


@pytest.fixture(scope="module")
def skyreels_path(tmp_path_factory):
    return make_tiny_checkpoint("skyreels", tmp_path_factory.mktemp("skyreels"))


def test_chunk_spans_and_refusals():
    c = Chunking(first=5, chunk=1, context=4)
    assert c.spans(5) == [(0, 5)]
    assert c.spans(7) == [(0, 5), (5, 6), (6, 7)]
    assert c.window == 5
    two = Chunking(first=3, chunk=2, context=1, context_noise=0.02)
    assert two.spans(7) == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(VpoError, match="not a whole number of chunks.*9, 17, 25"):
        two.spans(6)
    with pytest.raises(VpoError, match="not a whole number"):
        c.spans(4)
    with pytest.raises(VpoError, match="context noise"):
        Chunking(first=1, chunk=1, context=1, context_noise=1.5)


@pytest.mark.parametrize(("base", "overlap", "frames", "guidance"), [(9, 5, 17, 1.0), (9, 1, 25, 3.0)])
def test_skyreels_rollout_equals_diffusion_forcing_pipeline(skyreels_path, base, overlap, frames, guidance):
    """vpotool's rollout with the checkpoint's UniPC scheduler reproduces SkyReelsV2DiffusionForcingPipeline's long
    video mode (synchronous, ar_step 0): the first window, then windows that start with the overlap."""
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    _, height, width = FAMILY_SIZES["skyreels"]
    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(skyreels_path)
    backend = load_backend(
        "skyreels", skyreels_path, options={"base_frames": base, "overlap_frames": overlap, "addnoise": 0}
    )
    ch = backend.chunking
    shape = backend.latent_shape(frames, height, width)
    b = len(PROMPTS)
    # (the pipeline draws all its noise from the generator: passing ``latents`` fails in diffusers 0.42)
    ref = pipe(
        PROMPTS, height=height, width=width, num_frames=frames, num_inference_steps=3, guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0), output_type="latent", max_sequence_length=16,
        overlap_history=overlap, base_num_frames=base, addnoise_condition=0, fps=24,
    ).frames  # fmt: skip

    # The pipeline draws each later window's noise whole and overwrites its overlap with the context.
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn((b, shape[0], ch.first, *shape[2:]), generator=gen)]
    for a, e in ch.spans(shape[1])[1:]:
        window = torch.randn((b, shape[0], ch.context + e - a, *shape[2:]), generator=gen)
        parts.append(window[:, :, ch.context :])
    noise = torch.cat(parts, 2)
    cond = backend.encode_prompts(PROMPTS)
    uncond = backend.encode_negative(b) if guidance != 1.0 else None
    ours = rollout(
        backend, cond, noise, chunking=ch, steps=3, guidance=guidance, uncond=uncond,
        scheduler=backend.pipeline_scheduler,
    ).latents  # fmt: skip
    # the pipeline denoises the normalised latents; vpotool's latents are the same normalised latents
    assert ref.shape == ours.shape
    torch.testing.assert_close(ours, ref.float(), atol=2e-4, rtol=1e-3)


def test_first_chunk_is_the_bidirectional_sample(skyreels_path):
    """Without context, a chunk is an ordinary sample of its frames: the rollout's first window equals vpotool's
    bidirectional sampler on those frames; later chunks differ from sampling the long video at once."""
    backend = load_backend("skyreels", skyreels_path, options={"base_frames": 9, "overlap_frames": 5})
    ch = backend.chunking
    noise = seeded_noise((16, 5, 8, 8), [1, 2], "cpu")
    cond = backend.encode_prompts(PROMPTS)
    ar = rollout(backend, cond, noise, chunking=ch, steps=3).latents
    bi = sample(backend, cond, noise[:, :, : ch.first], steps=3).latents
    torch.testing.assert_close(ar[:, :, : ch.first], bi, atol=1e-5, rtol=1e-4)
    whole = sample(backend, cond, noise, steps=3).latents
    assert (ar[:, :, ch.first :] - whole[:, :, ch.first :]).abs().max() > 1e-3


def test_the_same_seed_at_more_frames_extends_the_video(skyreels_path):
    from families import prefix_chunks_equal

    backend = load_backend("skyreels", skyreels_path, options={"base_frames": 9, "overlap_frames": 5})
    assert prefix_chunks_equal(backend, 13, 21, 16, 16) == 4  # a window of 3 latent frames and one more, then two


def test_stochastic_rollout_logps_and_greedy(skyreels_path):
    backend = load_backend("skyreels", skyreels_path, options={"base_frames": 9, "overlap_frames": 5})
    ch = backend.chunking
    noise = seeded_noise((16, 5, 8, 8), [1, 2], "cpu")
    cond = backend.encode_prompts(PROMPTS)
    run = lambda **kw: rollout(backend, cond, noise, chunking=ch, steps=3, **kw)  # noqa: E731
    s1 = run(noise_level=0.7, step_seeds=[5, 6], keep_states=True)
    s2 = run(noise_level=0.7, step_seeds=[5, 6])
    greedy = run()
    assert s1.logps.shape == (2, 3 * 3) and torch.isfinite(s1.logps).all()
    torch.testing.assert_close(s1.latents, s2.latents)
    assert greedy.logps is None
    assert (s1.latents - greedy.latents).abs().mean() > 1e-3
    assert len(s1.states) == 4 and torch.equal(s1.states[0], noise) and torch.equal(s1.states[-1], s1.latents)


def test_rollout_memory_is_bounded_by_the_window(skyreels_path, monkeypatch):
    """However long the video, the denoiser never sees more than the window's latent frames."""
    backend = load_backend("skyreels", skyreels_path, options={"base_frames": 9, "overlap_frames": 5})
    seen = []
    predict = backend.predict
    monkeypatch.setattr(backend, "predict", lambda x, t, c: seen.append(x.shape[2]) or predict(x, t, c))
    noise = seeded_noise((16, 12, 8, 8), [1], "cpu")
    rollout(backend, backend.encode_prompts(PROMPTS[:1]), noise, chunking=backend.chunking, steps=2)
    assert max(seen) == backend.chunking.window == 3
    assert len(seen) == 2 * len(backend.chunking.spans(12))


def test_gradients_flow_through_the_chunk_not_the_context(skyreels_path):
    backend = load_backend("skyreels", skyreels_path, options={"base_frames": 9, "overlap_frames": 5})
    noise = seeded_noise((16, 4, 8, 8), [1], "cpu")
    cond = backend.encode_prompts(PROMPTS[:1])
    traj = rollout(backend, cond, noise, chunking=backend.chunking, steps=2, grad_steps=[1])
    traj.latents[:, :, -1].sum().backward()
    grads = [p.grad for p in backend.denoiser.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
