"""``--context-parallel 2`` on two CPU processes (torchrun, gloo): the two share each video's tokens, and what they
sample and train equals what one process does alone; the launches and sizes it cannot run are refused in one line.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from conftest import FAST, family_args, one_line_error, run_chain
from safetensors.torch import load_file
from test_distributed import ADAPTER, launch

CP = ["--context-parallel", 2]


def same_training(one, two, steps: int) -> None:
    """Each step's loss and gradient norm (gradients scaled as the groups' mean, before clipping) and the adapter
    after ``steps`` steps are one process's. The adapter's tolerance is AdamW's: entries whose gradient is near zero
    move by up to lr a step either way on float noise (more in a loop, whose later videos are sampled by the
    adapter), so it is compared as a whole."""
    import pandas as pd

    m1, m2 = (pd.read_parquet(p / "metrics.parquet").sort_values("step") for p in (one, two))
    assert list(m1["step"]) == list(m2["step"]) == list(range(1, steps + 1))
    for col in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor(m2[col].values), torch.tensor(m1[col].values), rtol=1e-4, atol=1e-6)
    a = load_file(str(one / "checkpoints" / f"step-{steps}" / ADAPTER))
    b = load_file(str(two / "checkpoints" / f"step-{steps}" / ADAPTER))
    assert a.keys() == b.keys()
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-3  # training moved B off zero
    for k in a:
        assert (b[k] - a[k]).norm() <= 1e-2 * a[k].norm(), k


def test_sampled_latents_on_a_context_group_equal_one_process(cli, prompts_file, tmp_path):
    """The tiny model's videos (6 heads, 12 tokens a video, 3 per head and process) are the same latents, ids and
    seeds; only the first process writes."""
    import pandas as pd

    args = ["sample", "--prompts", prompts_file, "--candidates", 2, *FAST]
    code, _, err = cli(*args, "--out", tmp_path / "one")
    assert code == 0, err
    launch([*args, *CP], tmp_path / "two", 2)
    one, two = (pd.read_parquet(tmp_path / n / "samples.parquet").sort_values("sample_id") for n in ("one", "two"))
    assert list(one["sample_id"]) == list(two["sample_id"]) and list(one["seed"]) == list(two["seed"])
    for rel in one["latent"]:
        a, b = (load_file(str(tmp_path / n / rel))["latents"] for n in ("one", "two"))
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["latents", "sample.yaml", "samples.parquet",
                                                                    "videos"]  # fmt: skip


@pytest.mark.parametrize("family", ["tiny", "ltx"])
def test_dpo_steps_on_a_context_group_equal_one_process(family, cli, prompts_file, tmp_path):
    """Two DPO steps: the tiny model under FSDP with gradient checkpointing (the recomputed blocks exchange again
    in the backward pass), and LTX (its plan splits the video, its cross-attention sees the whole masked prompt)."""
    env = {}
    if family == "tiny":
        from test_train_dpo import write_pairs

        pairs, model = write_pairs(tmp_path), ["--gradient-checkpointing"]
        env = {"ACCELERATE_USE_FSDP": "true"}
    else:
        from families import make_tiny_checkpoint

        folder = make_tiny_checkpoint("ltx", tmp_path / "ltx")
        run_chain(cli, prompts_file, tmp_path / "run", *family_args("ltx", folder))
        pairs, model = tmp_path / "run" / "pairs.parquet", ["--model", "ltx", "--model-path", folder]
    args = ["train-dpo", "--pairs", pairs, *model, "--max-steps", 2, "--lr", 1e-2, "--lora-rank", 2,
            "--beta", 100, "--batch-size", 2, "--device", "cpu"]  # fmt: skip
    code, _, err = cli(*args, "--out", tmp_path / "one")
    assert code == 0, err
    out = launch([*args, *CP], tmp_path / "two", 2, env)
    assert family != "tiny" or "FSDP: WanTransformer3DModel sharded over 2 processes" in out
    same_training(tmp_path / "one", tmp_path / "two", 2)


@pytest.mark.parametrize("trainer", ["train-refl", "train-scst"])
def test_reward_trainer_steps_on_a_context_group_equal_one_process(trainer, cli, prompts_file, tmp_path):
    """Two steps of ReFL (the reward's gradient through the decode and the gathered output) and of SCST (the
    stochastic rollout, its greedy baseline and the forward-process update): every process of the group draws
    the same noise and scores the same videos."""
    args = [trainer, "--prompts", prompts_file, "--reward", "brightness", "--max-steps", 2, "--lr", 1e-2,
            "--lora-rank", 2, "--batch-size", 1, "--guidance", 1.0, *FAST]  # fmt: skip
    if trainer == "train-scst":
        args += ["--noise-level", 0.7]
    code, _, err = cli(*args, "--out", tmp_path / "one")
    assert code == 0, err
    launch([*args, *CP], tmp_path / "two", 2)
    same_training(tmp_path / "one", tmp_path / "two", 2)


def test_loop_on_a_context_group_equals_one_process(tmp_path):
    """``loop``: the group samples, scores and pairs the iteration's prompts together (the first process writes
    the manifests), trains as one process, and the main process compares base and aligned alone."""
    import pandas as pd

    from vpotool.prompts import load_prompts

    val = tmp_path / "val.txt"  # two of world:val's prompts: the comparison's code path at a tenth of its cost
    val.write_text("".join(f"{text}\n" for _, text in load_prompts("world:val")[:2]))
    args = ["loop", "--prompts", "world:train", "--iterations", 2, "--prompts-per-iter", 2, "--candidates", 2,
            "--min-margin", 0, "--steps-per-iter", 1, "--reward", "world", "--eval-prompts", val,
            "--eval-seeds", 1, "--lr", 2e-3, "--guidance", 1.0, "--batch-size", 2, *FAST]  # fmt: skip
    launch(args, tmp_path / "one", 1)
    launch([*args, *CP], tmp_path / "two", 2)
    for it in ("iter-0000", "iter-0001"):
        one, two = (
            pd.read_parquet(tmp_path / n / it / "pairs.parquet").sort_values("pair_id") for n in ("one", "two")
        )
        assert list(one["pair_id"]) == list(two["pair_id"]) and len(one) > 0
        assert not any((tmp_path / "two" / it).glob("samples-*"))  # one group: no shards to merge
    same_training(tmp_path / "one", tmp_path / "two", 2)
    one, two = (pd.read_parquet(tmp_path / n / "eval" / "eval.parquet") for n in ("one", "two"))
    torch.testing.assert_close(torch.tensor(two["mean"].values), torch.tensor(one["mean"].values), atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "args, env, words",
    [
        (["sample", "--prompts", "p.txt", "--model", "cogvideox"], {"WORLD_SIZE": "2"},
         ["--model cogvideox has no context-parallel plan", "tiny, wan, ltx"]),
        (["train-scst", "--prompts", "p.txt", "--model", "tiny-ar"], {"WORLD_SIZE": "2"},
         ["--model tiny-ar has no context-parallel plan"]),
        (["train-refl", "--prompts", "p.txt"], {}, ["launch it with torchrun --nproc_per_node 2"]),
        (["loop"], {"WORLD_SIZE": "3"}, ["must divide the 3 processes", "pass one of 1, 3"]),
        (["sample", "--prompts", "p.txt", "--context-parallel", 4], {"WORLD_SIZE": "2"},
         ["--context-parallel 4 must divide the 2 processes"]),
    ],
)  # fmt: skip
def test_launches_context_parallelism_cannot_run_are_refused_in_one_line(args, env, words, cli, monkeypatch, tmp_path):
    """A family without a plan, no distributed launch, a degree that does not divide the launch: one line, exit 2,
    before any model loads or file is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a red circle moving left\n")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cp = [] if "--context-parallel" in args else CP
    one_line_error(cli(*args, *cp, "--out", tmp_path / "out", "--device", "cpu"), *words)
    assert not (tmp_path / "out").exists() or not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def test_heads_that_do_not_divide_the_degree_are_refused_in_one_line():
    """Ulysses gives each process of a group 1/N of the heads: the tiny model's 6 do not split over 4."""
    from vpotool.errors import VpoError
    from vpotool.models import load_backend
    from vpotool.models.context_parallel import Layout, enable

    backend = load_backend("tiny", device="cpu")
    with pytest.raises(VpoError, match="WanTransformer3DModel has 6 attention heads.*pass one of 2, 3, 6"):
        enable(backend, Layout(4, 0, 4))  # refused before any process group is needed


def test_a_video_whose_tokens_do_not_split_is_refused_before_anything_is_written(tmp_path):
    """9 frames of 8 x 8 are 3 latent frames of one token each for the tiny model: each process stops with the
    same line and exit status 2 (torchrun ends the other when the first has), and the run folder holds no file."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, "-m",
           "vpotool", "sample", "--prompts", str(prompts), "--frames", "9", "--height", "8", "--width", "8",
           "--steps", "2", "--device", "cpu", *map(str, CP), "--out", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and len(set(errors)) == 1 and "exitcode  : 2 " in result.stderr, result.stderr[-3000:]
    assert "a latent of 3 x 2 x 2 is 3 tokens for --model tiny" in errors[0]
    assert not re.search(r'File ".*/vpotool/', result.stderr), result.stderr  # torchrun's own traceback only
    assert not any(p.is_file() for p in (tmp_path / "out").rglob("*"))
