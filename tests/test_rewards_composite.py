"""Weighted composite rewards and --reward-path resolution: hand-computed values, gradients, errors, the manifest."""

import pytest
import torch

from vpotool.errors import VpoError
from vpotool.rewards import REWARDS, load_reward, load_rewards, reward_names, reward_path
from vpotool.rewards.composite import CompositeReward, normalized, parse_weights

PROMPTS = [
    "a red circle moving left slowly on a black background",
    "a blue square moving up quickly on a gray background",
]


class Constant:
    """A reward whose overall is a fixed value per video, with a declared range."""

    differentiable = False
    dimensions = ("value", "overall")

    def __init__(self, values, score_range):
        self.values, self.score_range, self.name = torch.tensor(values), score_range, "constant"

    def __call__(self, frames, prompts):
        return {"value": self.values, "overall": self.values}


def test_parse_weights():
    assert parse_weights("videoscore:1.0,clip:0.5") == {"videoscore": 1.0, "clip": 0.5}
    assert parse_weights("world:2, flicker") == {"world": 2.0, "flicker": 1.0}
    for bad in ("world:x", "world:-1", "world:0", "world:1,world:2", "world:nan"):
        with pytest.raises(VpoError):
            parse_weights(bad)


def test_reward_names_composite_is_one_canonical_reward():
    assert reward_names("world:1.0,flicker:0.50") == ["world:1,flicker:0.5"]
    assert reward_names("world,flicker") == ["world", "flicker"]
    with pytest.raises(VpoError, match="unknown reward 'nope'"):
        reward_names("world:1,nope:1")


def test_composite_normalises_each_part_by_its_range():
    # overall = (1 * (2.5 - 1) / (4 - 1) + 0.5 * (0.2 - 0) / (1 - 0)) / 1.5 = (0.5 + 0.1) / 1.5 = 0.4
    parts = {"a": Constant([2.5, 1.0], (1.0, 4.0)), "b": Constant([0.2, 1.0], (0.0, 1.0))}
    out = CompositeReward(parts, {"a": 1.0, "b": 0.5})(torch.zeros(2, 2, 3, 4, 4), ["x", "y"])
    assert out["overall"].tolist() == pytest.approx([0.4, (0.0 + 0.5) / 1.5])
    assert out["a.value"].tolist() == [2.5, 1.0] and out["b.overall"].tolist() == pytest.approx([0.2, 1.0])
    assert normalized(torch.tensor([5.5]), (1.0, 4.0)).item() == pytest.approx(1.5)  # not clamped


def test_composite_of_registered_rewards_is_differentiable():
    reward = load_reward("world:1,flicker:0.5")
    assert reward.differentiable and reward.name == "world:1,flicker:0.5"
    assert "world.motion" in reward.dimensions and reward.dimensions[-1] == "overall"
    frames = torch.rand(2, 4, 3, 16, 16, requires_grad=True)
    out = reward(frames, PROMPTS)
    want = (out["world.overall"] + 0.5 * out["flicker.overall"]) / 1.5
    assert torch.allclose(out["overall"], want)
    out["overall"].sum().backward()
    assert frames.grad is not None and frames.grad.abs().sum() > 0


def test_reward_path_resolution(monkeypatch):
    monkeypatch.setitem(REWARDS, "m1", REWARDS["flicker"])
    monkeypatch.setitem(REWARDS, "m2", REWARDS["flicker"])
    assert reward_path("/w", "m1", "m1,flicker") == "/w"
    assert reward_path("/w", "flicker", "m1,flicker") is None  # weight-free rewards take no weights
    assert reward_path("m1=/a,m2=/b", "m2", "m1,m2") == "/b"
    assert reward_path("m1=/a", "m2", "m1,m2") is None  # not named: the reward's own default id
    with pytest.raises(VpoError, match="name them"):
        reward_path("/w", "m1", "m1:1,m2:1")
    with pytest.raises(VpoError, match="unknown reward"):
        reward_path("nope=/a", "m1", "m1")


def test_load_rewards_reuses_loaded_ones_under_any_spelling():
    mine = load_reward("world:1.0,flicker:0.5")
    got = load_rewards("world:1,flicker:0.5", None, have={"world:1.0,flicker:0.5": mine})
    assert got == {"world:1,flicker:0.5": mine}


def test_optimising_two_separate_rewards_is_refused():
    with pytest.raises(VpoError, match="composite"):
        load_reward("world,flicker")


def test_score_writes_composite_columns_and_weights(cli, prompts_file, tmp_path):
    from conftest import FAST

    from vpotool.manifest import manifest_config, read_manifest

    run = tmp_path / "run"
    code, _, err = cli("sample", "--prompts", prompts_file, "--candidates", 2, "--out", run, *FAST)
    assert code == 0, err
    code, _, err = cli(
        "score", "--samples", run / "samples.parquet", "--reward", "flicker:1,smoothness:3", "--out", run / "s.parquet"
    )
    assert code == 0, err
    table = read_manifest(run / "s.parquet", "scores")
    rows = table.to_pylist()
    assert len(rows) == 4 and {r["reward"] for r in rows} == {"flicker:1,smoothness:3"}
    for r in rows:
        assert r["overall"] == pytest.approx((r["flicker.overall"] + 3 * r["smoothness.overall"]) / 4)
    assert manifest_config(table)["composites"]["flicker:1,smoothness:3"]["smoothness"] == {
        "weight": 3.0,
        "range": [0.0, 1.0],
    }
    code, _, err = cli(
        "pair", "--samples", run / "samples.parquet", "--scores", run / "s.parquet", "--out", run / "p.parquet"
    )
    assert code == 0, err


def test_parse_reward_options():
    from vpotool.rewards import parse_options

    got = parse_options("dynamics.top_fraction=0.1, temporal.flicker=2")
    assert got == {"dynamics": {"top_fraction": 0.1}, "temporal": {"flicker": 2.0}}
    assert parse_options("") == {} and parse_options(None) == {}
    # options a reward does not declare, of the wrong type or out of range
    for bad in ("dynamics=0.1", "top_fraction=0.1", "nope.x=1", "world.x=abc", "dynamics.top_fraction=lots"):
        with pytest.raises(VpoError):
            parse_options(bad)
    assert load_reward("dynamics", options="dynamics.top_fraction=0.2").top_fraction == 0.2
    composite = load_reward("dynamics:1,flicker:1", options="dynamics.top_fraction=0.3")
    assert composite.parts["dynamics"].top_fraction == 0.3
