"""eval on the tiny model: base vs adapter checkpoints, win rates, resume, adapter switching, the world's Frechet
distance, and one-line errors."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import FAST
from safetensors.torch import load_file

from vpotool.world.features import FEATURE_NAMES, clip_features, frechet_distance
from vpotool.world.rates import CHECKS

WORLD = [
    "a red circle moving left slowly on a black background",
    "a blue square moving up quickly on a white background",
]
DIMS = {
    "world": ["overall", "motion", "temporal_consistency", "text_alignment", "visual_quality"],
    "flicker": ["overall", "flicker"],
    "smoothness": ["overall", "smoothness"],
    "dynamics": ["overall", "dynamic_degree"],
}


def make_adapter(folder, scale: float = 0.05, seed: int = 0):
    """A LoRA checkpoint for the tiny model with random non-zero weights; returns the backend that carries it."""
    from vpotool.models import load_backend
    from vpotool.training.lora import add_lora, save_adapter

    backend = load_backend("tiny")
    params = add_lora(backend.denoiser, 4, 4.0, backend.lora_target_modules)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))
    save_adapter(backend.denoiser, folder, {"base_model": "tiny"})
    return backend


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "run1" / "checkpoints" / "step-4"
    make_adapter(folder)
    return folder


@pytest.fixture
def world_prompts_file(tmp_path):
    p = tmp_path / "heldout.txt"
    p.write_text("\n".join(WORLD) + "\n")
    return p


def test_eval_base_and_adapter_writes_every_metric_and_resumes(
    cli, adapter, world_prompts_file, tmp_path, monkeypatch
):
    out = tmp_path / "eval"
    args = ("eval", "--prompts", world_prompts_file, "--adapter", adapter, "--out", out, *FAST)
    code, stdout, err = cli(*args)
    assert code == 0, err
    assert "world.frechet ↓" in stdout and "lower is better" in stdout and "run1/step-4" in stdout
    assert "world.rate.flicker ↓" in stdout and "world.rate.static ↓" in stdout and "world.overall ↑" in stdout
    table = pd.read_parquet(out / "eval.parquet")
    rates = [f"world.rate.{c}" for c in CHECKS]
    metrics = [f"{r}.{d}" for r, dims in DIMS.items() for d in dims] + rates + ["world.frechet"]
    assert set(zip(table.checkpoint, table.metric, strict=True)) == {
        (c, m) for c in ("base", "run1/step-4") for m in metrics
    }
    assert len(table) == 2 * len(metrics)
    rewards = table[table.metric != "world.frechet"]
    assert (rewards.n == 2).all() and (rewards["std"] >= 0).all()
    assert (rewards[rewards.checkpoint == "base"].win_rate == 0.5).all()
    tuned = rewards[rewards.checkpoint == "run1/step-4"].win_rate
    assert tuned.between(0, 1).all() and set(tuned * 2) <= {0, 1, 2}  # two matched videos, ties count half
    frechet = table[table.metric == "world.frechet"]
    assert (frechet["mean"] >= 0).all() and frechet["std"].isna().all() and frechet.win_rate.isna().all()
    assert (frechet.n == 2).all()
    shares = table[table.metric.isin(rates)]
    assert set(shares["mean"] * 2) <= {0, 1, 2}  # the share of two videos passing each check
    from PIL import Image

    with Image.open(out / "strip.png") as strip:  # two prompts x two checkpoints, six frames each
        assert strip.size[1] >= 4 * 96 and strip.size[0] > 6 * 96

    # each checkpoint is an ordinary sample + score run; the same seeds, different weights
    base, tuned = (
        pd.read_parquet(out / "base" / "samples.parquet"),
        pd.read_parquet(out / "run1_step-4" / "samples.parquet"),
    )
    assert list(base.seed) == list(tuned.seed) and set(base.adapter) == {""} and set(tuned.adapter) == {str(adapter)}
    a = load_file(str(out / "base" / "latents" / "p00000-c00.safetensors"))["latents"]
    b = load_file(str(out / "run1_step-4" / "latents" / "p00000-c00.safetensors"))["latents"]
    assert not torch.allclose(a, b)
    assert len(pd.read_parquet(out / "run1_step-4" / "scores.parquet")) == 2 * len(DIMS)

    # a rerun samples nothing again; win rates against the adapter mirror those against the base
    import vpotool.stages.sample as stage

    calls = []
    real = stage.generate
    monkeypatch.setattr(stage, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, _, err = cli(*args, "--baseline", "run1/step-4", "--no-frechet")
    assert code == 0, err
    assert calls == []
    again = pd.read_parquet(out / "eval.parquet").set_index(["checkpoint", "metric"])
    assert "world.frechet" not in set(again.index.get_level_values("metric"))
    assert (again.loc["run1/step-4"].win_rate == 0.5).all()
    before = rewards.set_index(["checkpoint", "metric"])
    for m in metrics[: -len(rates) - 1]:
        assert again.loc[("base", m), "win_rate"] == pytest.approx(1 - before.loc[("run1/step-4", m), "win_rate"])
        assert again.loc[("base", m), "mean"] == before.loc[("base", m), "mean"]


def test_checkpoints_switch_on_a_backend_that_carries_a_trained_adapter(tmp_path):
    """What `loop` does: its backend holds the trained adapter; base must run bare, a checkpoint alone, and the
    trained adapter must be back afterwards."""
    from vpotool.models import load_backend
    from vpotool.stages.eval import checkpoint_active

    other = tmp_path / "other"
    make_adapter(other, scale=0.05, seed=1)
    trained = make_adapter(tmp_path / "trained", scale=0.05, seed=0)  # "default" adapter active
    bare = load_backend("tiny")
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([500.0])
    cond = bare.encode_prompts([WORLD[0]])

    def out(backend):
        with torch.no_grad():
            return backend.predict(x, t, cond)

    own = out(trained)
    assert not torch.allclose(own, out(bare))
    with checkpoint_active(trained, None):
        torch.testing.assert_close(out(trained), out(bare))
        assert trained.info.adapter == ""
    with checkpoint_active(trained, str(other)):
        with_other = out(trained)
        assert trained.info.adapter == str(other)
    assert not torch.allclose(with_other, own) and not torch.allclose(with_other, out(bare))
    torch.testing.assert_close(out(trained), own)
    assert list(trained.denoiser.peft_config) == ["default"]


def test_frechet_distance_hand_checked():
    a = torch.tensor([[0.0], [2.0]])  # mean 1, variance 2 (n - 1)
    b = torch.tensor([[3.0], [7.0]])  # mean 5, variance 8
    assert frechet_distance(a, b) == pytest.approx((1 - 5) ** 2 + (math.sqrt(2) - math.sqrt(8)) ** 2)  # 18

    # a diagonal case: points on the axes give a diagonal covariance, 2 s^2 / 3 per dimension
    def cross(mu, s):
        pts = torch.tensor([[s[0], 0.0], [-s[0], 0.0], [0.0, s[1]], [0.0, -s[1]]])
        return pts + torch.tensor(mu)

    a, b = cross([0.0, 1.0], [1.0, 2.0]), cross([3.0, -1.0], [4.0, 1.0])
    sd = lambda s: math.sqrt(2 / 3) * s  # noqa: E731
    want = (0 - 3) ** 2 + (1 + 1) ** 2 + (sd(1) - sd(4)) ** 2 + (sd(2) - sd(1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_is_zero_on_itself_symmetric_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = torch.randn(30, 6, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    near, far = frechet_distance(a, a + 0.5), frechet_distance(a, a + 2.0)
    assert near == pytest.approx(6 * 0.25, rel=1e-6) and far == pytest.approx(6 * 4.0, rel=1e-6)
    assert 0 < near < far


def test_clip_features_read_a_ground_truth_clip():
    from vpotool.world import parse_prompt, render_batch

    specs = [parse_prompt(p) for p in WORLD]
    clips = render_batch(specs, [0, 1], frames=8, height=32, width=32)
    f = clip_features(clips)
    assert f.shape == (2, len(FEATURE_NAMES)) and torch.isfinite(f).all()
    named = [dict(zip(FEATURE_NAMES, row.tolist(), strict=True)) for row in f]
    assert named[0]["fg_red"] > 3 * max(named[0]["fg_green"], named[0]["fg_blue"])  # edges blend in the background
    assert named[1]["fg_blue"] > 2 * max(named[1]["fg_red"], named[1]["fg_green"])
    # the prompted speeds (0.3 and 0.55 of the frame per clip), up to whole-pixel edges at 32 x 32
    assert named[0]["velocity_x"] == pytest.approx(-0.3, abs=0.06) and abs(named[0]["velocity_y"]) < 0.02
    assert named[1]["velocity_y"] == pytest.approx(-0.55, abs=0.06) and abs(named[1]["velocity_x"]) < 0.02
    assert named[0]["area_mean"] == pytest.approx(math.pi * 0.16**2, rel=0.2) and named[0]["area_spread"] < 0.01
    noisy = (clips + 0.2 * torch.randn(clips.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert (clip_features(noisy)[:, FEATURE_NAMES.index("crispness")] > f[:, FEATURE_NAMES.index("crispness")]).all()


def test_eval_on_other_prompts_skips_frechet(cli, prompts_file, tmp_path):
    code, _, err = cli("eval", "--prompts", prompts_file, "--out", tmp_path / "e", "--reward", "world", *FAST)
    assert code == 2 and "tiny-world prompts" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("eval", "--prompts", prompts_file, "--out", tmp_path / "e", "--reward", "flicker", *FAST)
    assert code == 0, err
    assert "world.frechet skipped" in err
    table = pd.read_parquet(tmp_path / "e" / "eval.parquet")
    assert list(table.metric) == ["flicker.overall", "flicker.flicker"] and list(table.checkpoint) == ["base"] * 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--reward", "world,nope"], "unknown reward 'nope'"),
        (["--adapter", "missing/step-1"], "no LoRA adapter"),
        (["--baseline", "other"], "--baseline other"),
        (["--seeds", "0"], "--seeds must be at least 1"),
    ],
)
def test_bad_input_is_one_line(cli, tmp_path, flags, message):
    code, _, err = cli("eval", "--out", tmp_path / "e", *flags, *FAST)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e" / "eval.parquet").exists()


def test_a_lower_better_metric_wins_where_the_checkpoint_has_less_of_it(tmp_path, capsys):
    from vpotool.manifest import read_manifest
    from vpotool.stages.eval import DIRECTIONS_KEY, print_table, read_directions, summary_row, write_eval

    # four matched videos: the aligned model flickers on two more, ties on the others
    base = {"a": 0.0, "b": 0.0, "c": 0.0, "d": 1.0}
    aligned = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0}
    metrics = ("world.rate.flicker", "world.rate.static", "world.rate.shape_present", "world.overall")
    rows = [summary_row(c, m, v, base, c == "base") for m in metrics for c, v in (("base", base), ("tuned", aligned))]
    win = {r["metric"]: r["win_rate"] for r in rows if r["checkpoint"] == "tuned"}
    assert win["world.rate.flicker"] == win["world.rate.static"] == 0.25  # (0 + 0 + 1/2 + 1/2) / 4: below 0.5
    assert win["world.rate.shape_present"] == win["world.overall"] == 0.75  # more of a good thing wins
    rows.append(dict(checkpoint="tuned", metric="world.drift.flicker", mean=0.1, std=math.nan, n=4, win_rate=math.nan))

    write_eval(tmp_path / "eval.parquet", rows, {})
    table = read_manifest(tmp_path / "eval.parquet", "eval")
    assert DIRECTIONS_KEY.encode() in table.schema.metadata
    assert read_directions(table) == {
        "world.rate.flicker": "lower",
        "world.rate.static": "lower",
        "world.rate.shape_present": "higher",
        "world.overall": "higher",
        "world.drift.flicker": "lower",
    }
    print_table(rows, ["base", "tuned"], "base")
    out = capsys.readouterr().out
    assert "world.rate.flicker ↓" in out and "world.rate.static ↓" in out and "world.drift.flicker ↓" in out
    assert "world.rate.shape_present ↑" in out and "world.overall ↑" in out and "lower is better" in out


def test_directions_of_every_metric_eval_writes():
    from vpotool.stages.eval import FRECHET, FVD, metric_direction

    lower = {FRECHET, FVD, "world.rate.static", "world.rate.flicker", "world.rate.flicker.seg3", "world.drift.static"}
    higher = {f"world.rate.{c}" for c in CHECKS if c not in ("static", "flicker")}
    higher |= {"world.overall", "flicker.flicker", "world.drift.shape_present", "videoscore.visual_quality"}
    assert {m: metric_direction(m) for m in lower | higher} == {
        m: "lower" if m in lower else "higher" for m in lower | higher
    }
