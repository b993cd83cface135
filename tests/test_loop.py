"""``vpotool loop``: iterations write every stage's manifests, resume after an interruption, run each algorithm."""

import pyarrow.parquet as pq
import pytest
import torch
from conftest import FAST
from safetensors.torch import load_file

from vpotool.stages.common import video_seed
from vpotool.training.lora import ADAPTER_FILE

LOOP = ["--prompts-per-iter", 2, "--candidates", 2, "--steps-per-iter", 2, "--batch-size", 2, "--min-margin", 0, *FAST]


@pytest.fixture
def eval_prompts(tmp_path):
    p = tmp_path / "heldout.txt"
    p.write_text("a red circle moving left slowly on a black background\n")
    return p


def test_loop_writes_every_manifest_and_compares(cli, tmp_path, eval_prompts):
    run = tmp_path / "run"
    code, out, err = cli("loop", "--out", run, "--iterations", 2, "--eval-prompts", eval_prompts, "--seed", 5, *LOOP)
    assert code == 0, err
    for it in ("iter-0000", "iter-0001"):
        for name in ("prompts", "samples", "scores", "pairs"):
            assert (run / it / f"{name}.parquet").is_file(), f"{it}/{name}.parquet"
        samples = pq.read_table(run / it / "samples.parquet").to_pylist()
        assert len(samples) == 2 * 2 and all((run / it / s["video"]).is_file() for s in samples)
    # the second iteration samples other prompts or seeds than the first
    seeds = [
        {r["seed"] for r in pq.read_table(run / it / "samples.parquet").to_pylist()}
        for it in ("iter-0000", "iter-0001")
    ]
    assert not seeds[0] & seeds[1]
    metrics = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["iteration"] for m in metrics] == [0, 0, 1, 1]
    assert all(0 <= m["sample_reward"] <= 1 for m in metrics)
    assert (run / "checkpoints" / "step-2" / ADAPTER_FILE).is_file()
    assert (run / "checkpoints" / "step-4" / ADAPTER_FILE).is_file()
    table = pq.read_table(run / "eval" / "eval.parquet").to_pylist()
    assert {r["checkpoint"] for r in table} >= {"base"} and len({r["checkpoint"] for r in table}) == 2
    assert any(r["metric"] == "world.overall" for r in table)
    assert "reward per iteration" in err
    # the comparison's videos follow --eval-seed (0), not the training seed, so seeds compare on the same videos
    base = pq.read_table(run / "eval" / "base" / "samples.parquet").to_pylist()
    assert [r["seed"] for r in base] == [video_seed(0, r["prompt_id"], r["candidate"]) for r in base]


def test_loop_resumes_after_an_interruption(cli, tmp_path, monkeypatch, eval_prompts):
    args = ["--iterations", 2, "--eval-prompts", "none", *LOOP]
    code, _, err = cli("loop", "--out", tmp_path / "whole", *args)
    assert code == 0, err

    import vpotool.stages.loop as loop

    real, calls = loop.dpo_step, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:  # the first step of the second iteration
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(loop, "dpo_step", interrupted)
    run = tmp_path / "cut"
    code, _, err = cli("loop", "--out", run, *args)
    assert code == 130, err
    first = (run / "iter-0000" / "samples.parquet").stat().st_mtime_ns
    monkeypatch.setattr(loop, "dpo_step", real)
    code, _, err = cli("loop", "--out", run, *args)
    assert code == 0, err
    assert "resuming" in err
    assert (run / "iter-0000" / "samples.parquet").stat().st_mtime_ns == first  # finished work is not redone
    assert [m["step"] for m in pq.read_table(run / "metrics.parquet").to_pylist()] == [1, 2, 3, 4]
    a = load_file(str(tmp_path / "whole" / "checkpoints" / "step-4" / ADAPTER_FILE))
    b = load_file(str(run / "checkpoints" / "step-4" / ADAPTER_FILE))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("algo", ["refl", "scst"])
def test_loop_runs_the_other_trainers(cli, tmp_path, algo):
    run = tmp_path / algo
    code, _, err = cli("loop", "--out", run, "--algo", algo, "--iterations", 1, "--eval-prompts", "none", *LOOP)
    assert code == 0, err
    assert (run / "iter-0000" / "scores.parquet").is_file()
    assert not (run / "iter-0000" / "pairs.parquet").exists()
    metrics = pq.read_table(run / "metrics.parquet").to_pylist()
    assert len(metrics) == 2 and all(m["loss"] == m["loss"] for m in metrics)
    weights = load_file(str(run / "checkpoints" / "step-2" / ADAPTER_FILE))
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # the adapter moved off zero


def test_loop_rejects_bad_options(cli, tmp_path):
    code, _, err = cli("loop", "--out", tmp_path / "r", "--algo", "ppo")
    assert code == 2 and "--algo must be dpo, refl or scst" in err
    code, _, err = cli("loop", "--out", tmp_path / "r", "--candidates", 1)
    assert code == 2 and "--candidates must be at least 2" in err


def test_loop_nft_with_the_sampler_as_old_policy_keeps_each_iterations_sampling_adapter(cli, tmp_path):
    """--nft-old sampler: the old policy of an iteration's NFT steps is the adapter that sampled it, the previous
    iteration's final one (checkpointed beside the policy, so a resume finds it)."""
    from vpotool.training.common import STATE_FILE

    run = tmp_path / "run"
    args = ["--algo", "scst", "--nft-old", "sampler", "--iterations", 2, "--eval-prompts", "none", *LOOP]
    code, _, err = cli("loop", "--out", run, *args)
    assert code == 0, err
    first, second = (run / "checkpoints" / f"step-{n}" for n in (2, 4))
    policy = {k.removeprefix("base_model.model."): v for k, v in load_file(str(first / ADAPTER_FILE)).items()}
    old = {k.removeprefix("adapter.old."): v for k, v in load_file(str(second / STATE_FILE)).items()
           if k.startswith("adapter.old.")}  # fmt: skip
    assert old and any(v.abs().sum() > 0 for k, v in old.items() if "lora_B" in k)
    lora_b = [k for k in old if "lora_B" in k]
    matched = [k for k in policy if "lora_B" in k]
    assert len(lora_b) == len(matched)
    for k_old, k_policy in zip(sorted(lora_b), sorted(matched), strict=True):
        torch.testing.assert_close(old[k_old], policy[k_policy], rtol=0, atol=0)
    moved = load_file(str(second / ADAPTER_FILE))
    assert any(not torch.equal(moved[k], policy[k]) for k in matched)  # the policy moved on from its old one


def test_loop_defaults_align_on_one_split_and_compare_on_another():
    from vpotool.stages.loop import default_eval_prompts
    from vpotool.training.config import LoopConfig

    cfg = LoopConfig()
    assert (cfg.prompts, default_eval_prompts(cfg.prompts)) == ("world:align", "world:val")
    assert default_eval_prompts("world:train") == "world:heldout"
    assert default_eval_prompts("prompts.txt") == "none"
    # the pair margin is on the reward's scale: the world reward's default, none for another reward
    assert (cfg.min_margin, LoopConfig(reward="temporal").min_margin, LoopConfig(min_margin=0.1).min_margin) == (
        0.02, 0.0, 0.1,
    )  # fmt: skip
