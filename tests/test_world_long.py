"""Long clips of the tiny world and their drift checks (vpotool.world.long)."""

from __future__ import annotations

import torch

from vpotool.world.grammar import WorldPrompt, world_prompts
from vpotool.world.long import long_path, render_long_clip, segment_bounds, segment_checks, torus_checks
from vpotool.world.render import render_clip

P = WorldPrompt("red", "circle", "left", "quickly", "black")


def test_a_long_clip_starts_as_the_world_clip_and_keeps_its_velocity():
    clip = render_long_clip(P, 65, seed=3)
    assert clip.shape == (65, 3, 32, 32)
    torch.testing.assert_close(clip[:17], render_clip(P, 17, seed=3), atol=1e-5, rtol=0)  # a circle never clips
    path = long_path(P, 65, 32, 32, seed=3)
    steps = (path.diff(dim=0)[:, 0] + 16) % 32 - 16  # around the torus
    torch.testing.assert_close(steps, torch.full((64,), -0.55 * 32 / 16), atol=1e-4, rtol=0)
    assert ((path[:, 0] >= 0) & (path[:, 0] < 32)).all()


def test_segments_share_their_boundary_frame():
    assert segment_bounds(17) == [(0, 17)]
    assert segment_bounds(65) == [(0, 17), (16, 33), (32, 49), (48, 65)]
    assert segment_bounds(69) == [(0, 17), (16, 33), (32, 49), (48, 69)]  # a short remainder joins the last


def test_ground_truth_long_clips_pass_every_segment_even_across_the_edge():
    for i, p in enumerate(world_prompts("val")[:12]):
        for seg in segment_checks(render_long_clip(p, 65, seed=i), p.text):
            assert seg["shape_present"] and seg["color_correct"] and seg["shape_correct"], p.text
            assert seg["direction_correct"] and not seg["static"] and not seg["flicker"], p.text


def test_drift_shows_in_the_segment_it_happens_in():
    clip = render_long_clip(P, 49, seed=1)
    stalled = clip.clone()
    stalled[32:] = clip[32]  # motion stops in the third segment
    faded = clip.clone()
    faded[16:] = clip[16:] * 0.0 + clip[0, :, :1, :1]  # the shape vanishes after the first segment
    checks = segment_checks(stalled, P.text)
    assert [c["static"] for c in checks] == [False, False, True]
    assert [c["shape_present"] for c in segment_checks(faded, P.text)] == [True, False, False]
    recoloured = clip.clone()
    recoloured[32:, 2] = recoloured[32:, 0]  # red turns magenta
    assert [c["color_correct"] for c in segment_checks(recoloured, P.text)] == [True, True, False]
    assert torus_checks(clip[:17], P.text)["direction_correct"]
