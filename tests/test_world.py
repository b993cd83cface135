"""The tiny world: grammar, renderer and the prompt-aware world reward."""

import dataclasses

import pytest
import torch

from vpotool.errors import VpoError
from vpotool.prompts import load_prompts
from vpotool.rewards import load_reward
from vpotool.world import parse_prompt, render_batch, render_clip, world_prompts
from vpotool.world.render import shape_coverage, shape_radius

PROMPT = "a red circle moving right slowly on a black background"


def test_splits_are_disjoint_and_cover_every_word():
    train, held = world_prompts("train"), world_prompts("heldout")
    assert len(train) + len(held) == len(world_prompts("all"))
    triples = lambda ps: {(p.color, p.shape, p.direction) for p in ps}  # noqa: E731
    assert not triples(train) & triples(held)
    for attr in ("color", "shape", "direction", "speed", "background"):
        assert {getattr(p, attr) for p in held} <= {getattr(p, attr) for p in train}
    assert all(p.color != p.background for p in world_prompts("all"))
    ids = [p.id for p in world_prompts("all")]
    assert len(set(ids)) == len(ids)


def test_alignment_splits_the_training_prompts():
    train, align, val = world_prompts("train"), world_prompts("align"), world_prompts("val")
    assert (len(align), len(val)) == (360, 60)
    assert sorted(align + val, key=train.index) == train
    assert not {p.id for p in align} & {p.id for p in val}
    # val asks for triples the loop aligns on, at other speeds or backgrounds
    assert {(p.color, p.shape, p.direction) for p in val} <= {(p.color, p.shape, p.direction) for p in align}
    assert world_prompts("val") == val  # drawn once, the same in every process


def test_parse_round_trip_and_errors():
    p = parse_prompt(PROMPT)
    assert (p.color, p.shape, p.direction, p.speed, p.background) == ("red", "circle", "right", "slowly", "black")
    assert parse_prompt(p.text) == p
    with pytest.raises(VpoError, match="not a tiny-world prompt"):
        parse_prompt("a cat playing piano")
    with pytest.raises(VpoError, match="unknown word 'purple'"):
        parse_prompt("a purple circle moving left slowly on a black background")


def test_world_prompts_through_load_prompts():
    rows = load_prompts("world:heldout")
    assert rows == [(p.id, p.text) for p in world_prompts("heldout")]
    with pytest.raises(VpoError, match="unknown world split"):
        load_prompts("world:nope")


def test_shapes_have_equal_area_and_render_in_colour():
    r = shape_radius(32, 32)
    for shape in ("circle", "square", "triangle"):
        area = shape_coverage(shape, torch.tensor(16.0), torch.tensor(16.0), r, 32, 32).sum().item()
        assert area == pytest.approx(torch.pi * r * r, rel=0.03)
    clip = render_clip(parse_prompt(PROMPT), frames=8, height=32, width=32, seed=3)
    assert clip.shape == (8, 3, 32, 32) and clip.min() >= 0 and clip.max() <= 1
    assert torch.allclose(clip[0, :, 0, 0], torch.tensor([0.02, 0.02, 0.02]))  # the black background
    red = (clip[:, 0] > 0.8) & (clip[:, 1] < 0.2)  # [T, H, W]
    xs = torch.arange(32.0)
    centre_x = (red * xs).sum((1, 2)) / red.sum((1, 2))
    assert (centre_x.diff() > 0).all()  # moving right
    assert centre_x[-1] - centre_x[0] == pytest.approx(0.3 * 32, abs=1.0)  # slowly: 0.3 of the frame per clip


def _score(clip, prompt=PROMPT):
    return {k: v.item() for k, v in load_reward("world")(clip[None], [prompt]).items()}


def test_world_reward_prefers_the_prompted_clip():
    p = parse_prompt(PROMPT)
    truth = render_clip(p, seed=1)
    gt = _score(truth)
    wrong_color = _score(render_clip(dataclasses.replace(p, color="blue"), seed=1))
    wrong_shape = _score(render_clip(dataclasses.replace(p, shape="triangle"), seed=1))
    wrong_way = _score(render_clip(dataclasses.replace(p, direction="left"), seed=1))
    static = _score(truth[:1].expand_as(truth))
    flicker = truth.clone()
    flicker[1::2] *= 0.5
    flickering = _score(flicker)
    for other in (wrong_color, wrong_shape, wrong_way, static, flickering):
        assert gt["overall"] > other["overall"] + 0.05
    assert gt["text_alignment"] > wrong_color["text_alignment"] + 0.3
    assert gt["text_alignment"] > wrong_shape["text_alignment"] + 0.2
    assert gt["motion"] > wrong_way["motion"] + 0.5 and gt["motion"] > static["motion"] + 0.4
    assert gt["temporal_consistency"] > flickering["temporal_consistency"] + 0.2
    assert all(0 <= v <= 1 for v in gt.values())


def test_world_reward_is_differentiable_and_batched():
    prompts = world_prompts("train")[:3]
    frames = render_batch(prompts, [0, 1, 2], frames=8, height=32, width=32).requires_grad_()
    scores = load_reward("world")(frames, [p.text for p in prompts])
    assert scores["overall"].shape == (3,)
    scores["overall"].sum().backward()
    assert frames.grad.abs().sum() > 0 and torch.isfinite(frames.grad).all()
    # batching does not change a clip's score
    alone = load_reward("world")(frames[1:2].detach(), [prompts[1].text])["overall"]
    assert alone.item() == pytest.approx(scores["overall"][1].item(), abs=1e-5)


def test_world_reward_refuses_prompts_outside_the_grammar():
    with pytest.raises(VpoError, match="world:train"):
        load_reward("world")(torch.zeros(1, 4, 3, 16, 16), ["a cat"])


def test_rates_pass_ground_truth_and_catch_each_rendered_defect():
    """Rendered ground truth passes every check; each rendered defect is caught by its own check."""
    import random

    from vpotool.world.data import defect_clip
    from vpotool.world.rates import clip_checks, rates

    prompts = random.Random(0).sample(world_prompts("all"), 40)
    texts = [p.text for p in prompts]
    truth = torch.stack([render_clip(p, seed=i) for i, p in enumerate(prompts)])
    r = rates(clip_checks(truth, texts))
    assert r == {"shape_present": 1, "color_correct": 1, "shape_correct": 1, "direction_correct": 1, "static": 0,
                 "flicker": 0}  # fmt: skip

    def altered(**change):
        return [dataclasses.replace(p, **{k: f(p) for k, f in change.items()}).text for p in prompts]

    other_color = altered(color=lambda p: next(c for c in ("red", "blue") if c not in (p.color, p.background)))
    assert rates(clip_checks(truth, other_color))["color_correct"] == 0
    next_shape = {"circle": "square", "square": "triangle", "triangle": "circle"}
    assert rates(clip_checks(truth, altered(shape=lambda p: next_shape[p.shape])))["shape_correct"] == 0
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    assert rates(clip_checks(truth, altered(direction=lambda p: opposite[p.direction])))["direction_correct"] == 0
    static = rates(clip_checks(torch.stack([defect_clip(p, "static", 17, 32, 32, 0) for p in prompts]), texts))
    assert static["static"] == 1 and static["direction_correct"] == 0 and static["shape_present"] == 1
    flicker = rates(clip_checks(torch.stack([defect_clip(p, "flicker", 17, 32, 32, 0) for p in prompts]), texts))
    assert flicker["flicker"] == 1
    empty = truth[:, :, :, :1, :1].expand_as(truth)  # the background alone
    assert rates(clip_checks(empty, texts))["shape_present"] == 0


def test_pretraining_mix_has_the_recorded_shares():
    import random

    from vpotool.world.data import DATA_MIX, training_example
    from vpotool.world.rates import clip_checks

    assert sum(DATA_MIX.values()) == pytest.approx(1.0)
    rng = random.Random(0)
    prompts = world_prompts("train")
    drawn = [training_example(rng.choice(prompts), rng, 17, 32, 32) for _ in range(600)]
    kinds = [k for _, _, k in drawn]
    for kind, share in DATA_MIX.items():
        assert kinds.count(kind) / len(kinds) == pytest.approx(share, abs=0.04)
    checks = clip_checks(torch.stack([c for _, c, _ in drawn]), [t for t, _, _ in drawn])
    for (_, _, kind), c in zip(drawn, checks, strict=True):  # the caption lies exactly where the kind says
        assert c["direction_correct"] == (kind not in ("wrong_direction", "static"))
        assert c["color_correct"] == (kind != "wrong_color")
