"""Several processes (``torchrun``, gloo on CPU) train the adapter one process trains on the same examples: for
every family under DDP (the backends read the denoiser through its wrapper), for each trainer, and under FSDP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import FAST, family_args, run_chain
from safetensors.torch import load_file

ADAPTER = "pytorch_lora_weights.safetensors"


def launch(args: list, out, processes: int, env: dict | None = None) -> str:
    """``vpotool ARGS --out OUT`` in one process, or under torchrun with ``processes`` CPU processes, with ``env``
    added to the environment. Returns the standard output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "vpotool", *map(str, args), "--out", str(out)]
    if processes > 1:
        with socket.socket() as sock:  # a free port, so parallel or back-to-back runs cannot collide
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", port, *cmd[1:]]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def assert_same_adapter(one, two, step: int) -> None:
    a = load_file(str(one / "checkpoints" / f"step-{step}" / ADAPTER))
    b = load_file(str(two / "checkpoints" / f"step-{step}" / ADAPTER))
    assert a.keys() == b.keys()
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-4  # training moved B off zero
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=1e-3)


def family_checkpoint(family: str, folder) -> str:
    if family == "opensora":
        from test_opensora import make_tiny_opensora

        return make_tiny_opensora(folder)
    from families import make_tiny_checkpoint, make_tiny_wan22

    if family == "wan22":  # two experts: a process's micro-batch may use only one of them
        return make_tiny_wan22(folder)

    return make_tiny_checkpoint(family, folder)


@pytest.mark.parametrize("family", ["wan", "wan22", "cogvideox", "ltx", "opensora"])
def test_train_dpo_on_two_processes_matches_one(family, cli, prompts_file, tmp_path):
    """Two processes with one pair each take the step one process takes with both pairs."""
    folder = family_checkpoint(family, tmp_path / family)
    model = "wan" if family == "wan22" else family
    sample = family_args(model, folder) if family != "opensora" else [
        "--model", "opensora", "--model-path", folder, "--frames", 9, "--height", 32, "--width", 32, "--steps", 2,
        "--device", "cpu"]  # fmt: skip
    run_chain(cli, prompts_file, tmp_path / "run", *sample)
    common = ["train-dpo", "--model", model, "--model-path", folder, "--pairs", tmp_path / "run" / "pairs.parquet",
              "--max-steps", 2, "--lr", 1e-2, "--lora-rank", 2, "--beta", 100, "--device", "cpu"]  # fmt: skip
    launch([*common, "--batch-size", 2], tmp_path / "one", 1)
    launch([*common, "--batch-size", 1], tmp_path / "two", 2)
    assert_same_adapter(tmp_path / "one", tmp_path / "two", 2)


@pytest.mark.parametrize("trainer", ["train-refl", "train-scst"])
def test_reward_trainers_on_two_processes_match_one_with_accumulation(trainer, prompts_file, tmp_path):
    """One process accumulating two micro-batches equals two processes with one each: same examples, seeds and
    trained steps (all follow the micro-batch's position in the data stream), gradients averaged alike."""
    common = [trainer, "--prompts", prompts_file, "--reward", "brightness", "--max-steps", 2, "--lr", 1e-2,
              "--lora-rank", 2, "--batch-size", 1, "--guidance", 1.0, *FAST]  # fmt: skip
    if trainer == "train-scst":
        common += ["--noise-level", 0.7, "--train-fraction", 0.5]
    launch([*common, "--grad-accum", 2], tmp_path / "one", 1)
    launch(common, tmp_path / "two", 2)
    assert_same_adapter(tmp_path / "one", tmp_path / "two", 2)


def test_scst_on_autoregressive_rollouts_on_two_processes_matches_one(prompts_file, tmp_path):
    """The same for SCST on ``tiny-ar``'s own rollouts with per-chunk advantages: each process rolls out its
    micro-batch chunk by chunk, and the averaged gradients give the adapter of one accumulating process."""
    common = ["train-scst", "--model", "tiny-ar", "--prompts", prompts_file, "--reward", "brightness",
              "--max-steps", 2, "--lr", 1e-2, "--lora-rank", 2, "--batch-size", 1, "--guidance", 1.0,
              "--frames", 33, "--height", 16, "--width", 16, "--steps", 2, "--device", "cpu",
              "--advantage", "chunk", "--train-fraction", 0.5]  # fmt: skip
    launch([*common, "--grad-accum", 2], tmp_path / "one", 1)
    launch(common, tmp_path / "two", 2)
    assert_same_adapter(tmp_path / "one", tmp_path / "two", 2)


def test_loop_on_two_processes_writes_the_manifests_of_one(tmp_path):
    """``torchrun --nproc_per_node 2 -m vpotool loop``: each process samples and scores half of every iteration's
    prompts; the merged manifests hold the same samples (ids, seeds, scores) and pairs as one process's, and the
    adapter one process trains at batch 2 is the one two processes train at batch 1 each."""
    import pandas as pd

    common = ["loop", "--prompts", "world:train", "--iterations", 2, "--prompts-per-iter", 4, "--candidates", 2,
              "--min-margin", 0, "--steps-per-iter", 2, "--reward", "world", "--eval-prompts", "none", "--lr", 1e-2,
              "--guidance", 1.0, *FAST]  # fmt: skip
    launch([*common, "--batch-size", 2], tmp_path / "one", 1)
    launch([*common, "--batch-size", 1], tmp_path / "two", 2)
    for it in ("iter-0000", "iter-0001"):
        for kind, key in (("samples", "sample_id"), ("scores", "sample_id"), ("pairs", "pair_id")):
            one = pd.read_parquet(tmp_path / "one" / it / f"{kind}.parquet").sort_values(key).reset_index(drop=True)
            two = pd.read_parquet(tmp_path / "two" / it / f"{kind}.parquet").sort_values(key).reset_index(drop=True)
            assert list(one[key]) == list(two[key]), (it, kind)
            if kind == "samples":
                assert list(one["seed"]) == list(two["seed"])
            if kind == "scores":
                # float differences of other batch compositions, through the mp4's rounding to 8 bits
                torch.testing.assert_close(
                    torch.tensor(one["overall"]), torch.tensor(two["overall"]), atol=2e-3, rtol=0
                )
    assert_same_adapter(tmp_path / "one", tmp_path / "two", 4)


def test_fsdp_on_two_processes_checkpoints_and_resumes_to_the_adapter_of_one(tmp_path):
    """``ACCELERATE_USE_FSDP=true torchrun --nproc_per_node 2`` on CPU: vpotool shards the denoiser itself
    (accelerate does FSDP on GPUs only). At batch 1 each, the two processes write the checkpoint one process writes
    at batch 2, the same files (adapter, reference adapter, AdamW moments gathered whole); stopped there and
    resumed, they reach the adapter of the uninterrupted run."""
    from families import make_tiny_checkpoint
    from test_train_dpo import write_pairs

    folder = make_tiny_checkpoint("wan", tmp_path / "wan")
    # The reference adapter is copied from the policy every 2 steps: the resumed run's loss at step 4 compares the
    # policy with the reference it loaded from the step-2 checkpoint.
    common = ["train-dpo", "--model", "wan", "--model-path", folder, "--pairs", write_pairs(tmp_path), "--lr", 1e-2,
              "--lora-rank", 2, "--beta", 100, "--ref-update-interval", 2, "--save-every", 2,
              "--device", "cpu"]  # fmt: skip
    launch([*common, "--max-steps", 4, "--batch-size", 2], tmp_path / "one", 1)
    fsdp = {"ACCELERATE_USE_FSDP": "true"}
    out = launch([*common, "--max-steps", 2, "--batch-size", 1], tmp_path / "two", 2, fsdp)
    assert "FSDP: WanTransformer3DModel sharded over 2 processes (2 transformer blocks and the root)" in out
    one, two = (load_file(str(tmp_path / n / "checkpoints" / "step-2" / "state" / "trainer_state.safetensors"))
                for n in ("one", "two"))  # fmt: skip
    assert one.keys() == two.keys() and any(k.startswith("adapter.ref.") for k in one)
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=2e-4, rtol=1e-3)
    assert_same_adapter(tmp_path / "one", tmp_path / "two", 2)
    out = launch([*common, "--max-steps", 4, "--batch-size", 1], tmp_path / "two", 2, fsdp)
    assert "resuming" in out
    assert_same_adapter(tmp_path / "one", tmp_path / "two", 4)


@pytest.mark.parametrize("args", [["loop"], ["train-refl", "--prompts", "p.txt", "--backprop-mode", "random"]])
def test_runs_fsdp_cannot_follow_are_refused_in_one_line(args, cli, monkeypatch, tmp_path):
    """Under FSDP every process must call the sharded denoiser in step: a loop (each process samples its own share
    of the prompts) and ReFL's random stop (each its own step) are refused before any work."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli(*args, "--out", tmp_path / "out", "--device", "cpu")
    assert code == 2 and "cannot run under FSDP" in err and len(err.strip().splitlines()) == 1, err


def test_fsdp1_configs_and_two_expert_denoisers_are_refused_in_one_line(monkeypatch):
    """accelerate's FSDP1 (flat parameters, which the checkpoint code cannot read) and Wan 2.2's two experts (a
    process whose micro-batch needs one expert would wait for the other's weights) stop before any sharding."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from vpotool.errors import VpoError
    from vpotool.training.fsdp import shard_if_requested

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    with pytest.raises(VpoError, match="fsdp_version: 2"):
        shard_if_requested(fsdp1, torch.nn.Linear(2, 2), "wan")
    cpu = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, is_fsdp2=False)
    experts = SimpleNamespace(experts={"transformer": torch.nn.Linear(2, 2), "transformer_2": torch.nn.Linear(2, 2)})
    with pytest.raises(VpoError, match="two-expert denoiser cannot be sharded"):
        shard_if_requested(cpu, experts, "wan")
