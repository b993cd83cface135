"""train-dpo on the tiny model: the objective moves, weights change, the curriculum reference updates on time,
an interrupted run resumes to the same adapter, and checkpoints load into diffusers and `sample --adapter`."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import FAST, family_args, run_chain

from vpotool.latents import save_latent
from vpotool.manifest import write_manifest
from vpotool.training.config import DpoConfig
from vpotool.training.dpo import train_dpo
from vpotool.training.lora import adapter_state

PROMPTS = ["a red circle moving left", "a blue square moving up", "a green ring moving down", "a yellow dot"]


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path)


def write_pairs(folder):
    """Four pairs on tiny latents (16 channels x 3 frames x 4 x 4): smooth ramps chosen over noise, in
    ``folder/pairs.parquet``."""
    (folder / "latents").mkdir()
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, p in enumerate(PROMPTS):
        ramp = torch.linspace(-1, 1, 4).view(1, 1, 4, 1).expand(16, 3, 4, 4) * (0.5 + 0.1 * i)
        save_latent(folder / "latents" / f"w{i}.safetensors", ramp.clone(), {})
        save_latent(folder / "latents" / f"l{i}.safetensors", torch.randn(16, 3, 4, 4, generator=g), {})
        rows.append(
            dict(
                pair_id=f"w{i}>l{i}", prompt_id=f"p{i}", prompt=p, chosen_id=f"w{i}", rejected_id=f"l{i}",
                chosen_score=1.0, rejected_score=0.0, margin=1.0, dimension="overall", source="test",
                chosen_video="", rejected_video="", chosen_latent=f"latents/w{i}.safetensors",
                rejected_latent=f"latents/l{i}.safetensors",
            )
        )  # fmt: skip
    write_manifest(folder / "pairs.parquet", rows, "pairs")
    return folder / "pairs.parquet"


def config(pairs, out, **kw) -> DpoConfig:
    base = dict(pairs=str(pairs), out=str(out), max_steps=6, lr=1e-3, batch_size=4, lora_rank=4, beta=500.0)
    return DpoConfig(**{**base, "device": "cpu", **kw})


def held_out_accuracy(trainer, pairs_path, seed=123) -> float:
    """Implicit accuracy of the current policy against the base model on the pairs, with noise and timesteps
    the training never drew."""
    from vpotool.manifest import read_manifest
    from vpotool.training.dpo import load_pair_latents, pair_loss

    rows = read_manifest(pairs_path, "pairs").to_pylist()
    b = trainer.backend
    lat_w, lat_l = load_pair_latents(pairs_path, rows, b, pairs_path.parent / "encoded")
    cfg = DpoConfig(pairs="x", out="x", beta=500.0)
    with torch.no_grad():
        out = pair_loss(b, trainer.denoiser, lat_w, lat_l, b.encode_prompts([r["prompt"] for r in rows]),
                        [seed + 2 * i for i in range(len(rows))], cfg, "base")  # fmt: skip
    return out.implicit_acc.item(), out.loss.item()


def test_dpo_changes_the_adapter_and_raises_implicit_accuracy(pairs, tmp_path):
    seen = {}

    def on_step(step, trainer):
        if step == 1:
            seen["first"] = {k: v.clone() for k, v in adapter_state(trainer.denoiser).items()}
        seen["last"] = {k: v.clone() for k, v in adapter_state(trainer.denoiser).items()}
        seen["acc"], seen["loss"] = held_out_accuracy(trainer, pairs)

    train_dpo(config(pairs, tmp_path / "out", max_steps=8), on_step=on_step)
    metrics = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert list(metrics.step) == list(range(1, 9))
    assert metrics.loss[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the first step
    assert metrics.implicit_acc[0] == 0.5
    assert any(not torch.equal(seen["first"][k], seen["last"][k]) for k in seen["first"])
    assert seen["acc"] > 0.5 and seen["loss"] < math.log(2)
    assert (tmp_path / "out" / "checkpoints" / "step-8" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "out" / "train-dpo.yaml").is_file()


def reference_output(trainer, probe):
    from vpotool.training.lora import reference_mode

    x, t, cond = probe
    with torch.no_grad(), reference_mode(trainer.denoiser, "ref" if "ref" in trainer.denoiser.peft_config else "base"):
        return trainer.backend.predict(x, t, cond).clone()


@pytest.mark.parametrize("interval", [2, 0])
def test_curriculum_reference_changes_exactly_every_interval(pairs, tmp_path, interval):
    outputs = {}

    def on_step(step, trainer):
        if not outputs:
            g = torch.Generator().manual_seed(5)
            probe = (
                torch.randn(1, 16, 3, 4, 4, generator=g),
                torch.tensor([500.0]),
                trainer.backend.encode_prompts(["a red circle"]),
            )
            outputs["probe"] = probe
        outputs[step] = reference_output(trainer, outputs["probe"])

    # The reference before any step equals the base model; record it from a fresh tiny backend.
    from vpotool.models import load_backend

    base = load_backend("tiny")
    train_dpo(config(pairs, tmp_path / "out", max_steps=6, ref_update_interval=interval), on_step=on_step)
    x, t, cond = outputs["probe"]
    with torch.no_grad():
        prev = base.predict(x, t, cond)
    changed = []
    for step in range(1, 7):
        if not torch.allclose(outputs[step], prev, atol=1e-7):
            changed.append(step)
        prev = outputs[step]
    assert changed == ([2, 4, 6] if interval else [])
    metrics = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert list(metrics.step[metrics.ref_updated == 1]) == ([2, 4, 6] if interval else [])


def test_interrupted_training_resumes_to_the_same_adapter(pairs, tmp_path):
    train_dpo(config(pairs, tmp_path / "full", ref_update_interval=2))
    full = adapter_state_of(tmp_path / "full" / "checkpoints" / "step-6")

    def crash(step, trainer):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_dpo(config(pairs, tmp_path / "cut", ref_update_interval=2, save_every=2), on_step=crash)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    resumed_from = {}
    train_dpo(
        config(pairs, tmp_path / "cut", ref_update_interval=2, save_every=2, resume=True),
        on_step=lambda step, tr: resumed_from.setdefault("step", step),
    )
    assert resumed_from["step"] == 5  # continued after the step-4 checkpoint
    metrics = pd.read_parquet(tmp_path / "cut" / "metrics.parquet")
    assert list(metrics.step) == [1, 2, 3, 4, 5, 6]
    resumed = adapter_state_of(tmp_path / "cut" / "checkpoints" / "step-6")
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=1e-6, rtol=1e-5)


def adapter_state_of(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def test_sample_with_adapter_differs_and_records_it(cli, pairs, tmp_path, prompts_file):
    train_dpo(config(pairs, tmp_path / "out", max_steps=3, lr=1e-2))
    ckpt = tmp_path / "out" / "checkpoints" / "step-3"
    assert cli("sample", "--prompts", prompts_file, "--candidates", 1, "--out", tmp_path / "base", *FAST)[0] == 0
    code, _, err = cli(
        "sample", "--prompts", prompts_file, "--candidates", 1, "--out", tmp_path / "tuned", "--adapter", ckpt, *FAST
    )
    assert code == 0, err
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "base" / "latents" / "p00000-c00.safetensors"))["latents"]
    b = load_file(str(tmp_path / "tuned" / "latents" / "p00000-c00.safetensors"))["latents"]
    assert not torch.allclose(a, b)
    assert set(pd.read_parquet(tmp_path / "tuned" / "samples.parquet").adapter) == {str(ckpt)}
    code, _, err = cli(
        "sample", "--prompts", prompts_file, "--out", tmp_path / "x", "--adapter", tmp_path / "nope", *FAST
    )
    assert code == 2 and "no LoRA adapter" in err


def test_train_dpo_cli_and_wrong_manifest(cli, pairs, tmp_path):
    out = tmp_path / "cli"
    code, _, err = cli(
        "train-dpo", "--pairs", pairs, "--out", out, "--max-steps", 2, "--lora-rank", 2, "--device", "cpu"
    )
    assert code == 0, err
    assert len(pd.read_parquet(out / "metrics.parquet")) == 2
    samples = tmp_path / "s.parquet"
    from vpotool.manifest import write_manifest

    write_manifest(samples, [], "samples")
    code, _, err = cli("train-dpo", "--pairs", samples, "--out", out)
    assert code == 2 and "is a samples manifest" in err and len(err.strip().splitlines()) == 1


def test_checkpoint_loads_into_the_diffusers_wan_pipeline(cli, prompts_file, tmp_path):
    from diffusers import WanPipeline
    from families import FAMILY_SIZES, make_tiny_checkpoint

    folder = make_tiny_checkpoint("wan", tmp_path / "wan")
    frames, h, w = FAMILY_SIZES["wan"]
    run = tmp_path / "run"
    run_chain(cli, prompts_file, run, *family_args("wan", folder))
    args = ("--model", "wan", "--model-path", folder, "--pairs", run / "pairs.parquet", "--out", run / "dpo")
    code, _, err = cli(
        "train-dpo", *args, "--max-steps", 2, "--lr", 0.05, "--lora-rank", 2, "--beta", 100, "--device", "cpu"
    )
    assert code == 0, err

    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    pipe = WanPipeline(
        transformer=WanTransformer3DModel.from_pretrained(folder, subfolder="transformer"),
        vae=AutoencoderKLWan.from_pretrained(folder, subfolder="vae"),
        text_encoder=UMT5EncoderModel.from_pretrained(folder, subfolder="text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        scheduler=UniPCMultistepScheduler.from_pretrained(folder, subfolder="scheduler"),
    )
    kwargs = dict(
        prompt="a red circle", num_frames=frames, height=h, width=w, num_inference_steps=2, output_type="latent"
    )
    before = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    pipe.load_lora_weights(str(run / "dpo" / "checkpoints" / "step-2"))
    after = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert not torch.allclose(before, after)


def test_two_processes_match_one_with_the_same_effective_batch(pairs, tmp_path):
    """torchrun with 2 CPU processes (gloo DDP) and batch 2 each reaches the adapter one process reaches with
    batch 4: data order, noise and timesteps follow each example's position, not the process layout."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    common = ["--pairs", str(pairs), "--max-steps", "3", "--lr", "1e-3", "--lora-rank", "4", "--beta", "500"]
    common += ["--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = [sys.executable, "-m", "vpotool", "train-dpo", *common, "--batch-size", "4", "--out", str(tmp_path / "one")]
    subprocess.run(one, check=True, capture_output=True, env=env)
    import socket

    with socket.socket() as sock:  # a free port, so parallel or back-to-back runs cannot collide
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    two = [*launcher, "-m", "vpotool", "train-dpo", *common, "--batch-size", "2", "--out", str(tmp_path / "two")]
    result = subprocess.run(two, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    a = load_file(str(tmp_path / "one" / "checkpoints" / "step-3" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step-3" / "pytorch_lora_weights.safetensors"))
    assert max(a[k].abs().max().item() for k in a) > 1e-2  # training moved the adapter
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=1e-3)
    m1, m2 = (pd.read_parquet(tmp_path / n / "metrics.parquet") for n in ("one", "two"))
    torch.testing.assert_close(torch.tensor(m1.loss.values), torch.tensor(m2.loss.values), atol=1e-4, rtol=1e-4)


def test_pairs_without_latents_are_encoded_from_their_videos(cli, prompts_file, tmp_path):
    """Human-labelled or external pairs may have only videos: train-dpo encodes them through the backend."""
    from vpotool.manifest import read_manifest, write_manifest
    from vpotool.models import load_backend
    from vpotool.training.dpo import load_pair_latents

    run = tmp_path / "run"
    run_chain(cli, prompts_file, run)
    rows = read_manifest(run / "pairs.parquet", "pairs").to_pylist()
    for r in rows:
        r["chosen_latent"] = r["rejected_latent"] = ""
    write_manifest(run / "videos_only.parquet", rows, "pairs")
    backend = load_backend("tiny")
    lat_w, lat_l = load_pair_latents(run / "videos_only.parquet", rows, backend, tmp_path / "encoded")
    assert len(list((tmp_path / "encoded").glob("*.safetensors"))) == 4  # encoded once, reused afterwards
    stored_rows = read_manifest(run / "pairs.parquet", "pairs").to_pylist()
    stored, _ = load_pair_latents(run / "pairs.parquet", stored_rows, backend, tmp_path / "unused")
    assert not (tmp_path / "unused").exists()  # pairs with latent files encode nothing
    assert lat_w.shape == stored.shape == (2, 16, 3, 4, 4)
    from vpotool.video import frames_to_tensor, read_video

    def encoded(video):
        return backend.encode(frames_to_tensor(read_video(run / video)).unsqueeze(0))[0]

    for i, r in enumerate(rows):  # each side comes from its own video, not the other one
        assert torch.equal(lat_w[i], encoded(r["chosen_video"])) and torch.equal(
            lat_l[i], encoded(r["rejected_video"])
        )
        assert not torch.equal(lat_w[i], lat_l[i])
    code, _, err = cli(
        "train-dpo",
        "--pairs",
        run / "videos_only.parquet",
        "--out",
        tmp_path / "o",
        "--max-steps",
        1,
        "--device",
        "cpu",
    )
    assert code == 0, err


def test_bfloat16_model_trains_float32_adapters_like_a_float32_model(pairs, tmp_path):
    """Frozen weights in bf16, adapter in float32: the adapter learns and its update follows the float32 run's
    (bf16 adapter weights would round small updates away)."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        seen = {}

        def on_step(step, trainer, seen=seen):
            seen["params"] = trainer.params
            seen["state"] = {k: v.detach().clone() for k, v in adapter_state(trainer.denoiser).items()}

        train_dpo(config(pairs, tmp_path / dtype, max_steps=4, lr=1e-3, dtype=dtype), on_step=on_step)
        assert all(p.dtype == torch.float32 for p in seen["params"])
        runs[dtype] = seen["state"]
    deltas = {d: torch.cat([v.flatten() for k, v in sorted(s.items()) if "lora_B" in k]) for d, s in runs.items()}
    assert deltas["float32"].abs().max() > 1e-3  # B started at zero: this is the update
    cos = torch.nn.functional.cosine_similarity(deltas["float32"], deltas["bfloat16"], dim=0)
    rel = (deltas["float32"] - deltas["bfloat16"]).norm() / deltas["float32"].norm()
    assert cos > 0.95 and rel < 0.3, (cos, rel)


def test_rerun_after_a_kill_before_the_first_checkpoint_logs_each_step_once(pairs, tmp_path):
    """A run killed after logging step 1 but before any checkpoint, rerun as it was: it starts over, and
    metrics.parquet holds steps 1..6 once each. Rerunning the finished run trains nothing and changes nothing."""

    class Killed(Exception):
        pass

    def kill(step, trainer):
        if step == 1:
            raise Killed

    with pytest.raises(Killed):
        train_dpo(config(pairs, tmp_path / "out", save_every=3), on_step=kill)
    assert list(pd.read_parquet(tmp_path / "out" / "metrics.parquet").step) == [1]
    train_dpo(config(pairs, tmp_path / "out", save_every=3))
    first = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert list(first.step) == [1, 2, 3, 4, 5, 6]
    weights = (tmp_path / "out" / "checkpoints" / "step-6" / "pytorch_lora_weights.safetensors").read_bytes()
    train_dpo(config(pairs, tmp_path / "out", save_every=3))  # rerun of a finished run: resumes at its end
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "metrics.parquet"), first)
    assert (tmp_path / "out" / "checkpoints" / "step-6" / "pytorch_lora_weights.safetensors").read_bytes() == weights


def test_resume_under_another_lora_shape_or_no_resume_is_refused_in_one_line(pairs, tmp_path):
    """Resuming under options that change what the run learns (LoRA shape, pairs, beta, batch, seed) is refused in
    one line naming them; a longer run or another learning rate continues."""
    import pyarrow.parquet as pq

    from vpotool.errors import VpoError

    other = tmp_path / "other-pairs.parquet"  # other pairs (a byte-identical copy would resume)
    table = pq.read_table(pairs)
    pq.write_table(table.slice(0, 3).replace_schema_metadata(table.schema.metadata), other)

    train_dpo(config(pairs, tmp_path / "out", max_steps=2))
    with pytest.raises(VpoError, match=r"lora_rank 4 -> 8.*new --out") as e:
        train_dpo(config(pairs, tmp_path / "out", max_steps=4, lora_rank=8))
    assert "\n" not in str(e.value)
    with pytest.raises(VpoError, match="already holds checkpoints up to step-2"):
        train_dpo(config(pairs, tmp_path / "out", max_steps=4, resume=False))
    cases = [(pairs, dict(beta=100.0), "beta 500.0 -> 100.0"), (other, {}, "pairs"),
             (pairs, dict(batch_size=2), "batch_size 4 -> 2"), (pairs, dict(seed=1), "seed 0 -> 1")]  # fmt: skip
    for source, changed, shown in cases:
        with pytest.raises(VpoError, match=shown):
            train_dpo(config(source, tmp_path / "out", max_steps=4, **changed))
    train_dpo(config(pairs, tmp_path / "out", max_steps=4, lr=5e-4))  # a new learning rate may continue
    assert list(pd.read_parquet(tmp_path / "out" / "metrics.parquet").step) == [1, 2, 3, 4]


@pytest.mark.parametrize("damage", ["self_pair", "corrupt_latent"])
def test_bad_pairs_stop_with_one_line_and_no_output(damage, pairs, cli, tmp_path):
    from vpotool.manifest import read_manifest

    rows = read_manifest(pairs, "pairs").to_pylist()
    if damage == "self_pair":
        rows[1]["rejected_id"], rows[1]["rejected_latent"] = rows[1]["chosen_id"], rows[1]["chosen_latent"]
        write_manifest(pairs, rows, "pairs")
    else:
        latent = pairs.parent / rows[2]["chosen_latent"]
        latent.write_bytes(latent.read_bytes()[:40])  # truncated mid-header
    code, _, err = cli("train-dpo", "--pairs", pairs, "--out", tmp_path / "o", "--max-steps", 1, "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert ("itself" if damage == "self_pair" else "unreadable latent file") in err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_gradient_checkpointing_on_a_model_without_it_is_refused_in_one_line(pairs, tmp_path):
    """Asking for gradient checkpointing on a denoiser that cannot do it stops with one line, instead of silently
    training without the memory saving."""
    from vpotool.errors import VpoError
    from vpotool.models import load_backend
    from vpotool.training.common import setup

    backend = load_backend("tiny", None, "cpu")
    backend.denoiser._supports_gradient_checkpointing = False
    with pytest.raises(VpoError, match="does not support it; drop the flag"):
        setup(config(pairs, tmp_path / "run", gradient_checkpointing=True), backend=backend)
    setup(config(pairs, tmp_path / "run", gradient_checkpointing=False), backend=load_backend("tiny", None, "cpu"))


def test_beta_defaults_by_prediction_type_and_is_recorded(pairs, tmp_path):
    """Unset ``--beta`` is 500 for flow models and Diffusion-DPO's 5000 for epsilon and v-prediction ones; the
    resolved value lands in train-dpo.yaml; a given --beta wins."""
    import types

    import yaml

    from vpotool.training.dpo import dpo_beta

    unset = DpoConfig(pairs="x", out="x")
    assert unset.beta is None
    for prediction, beta in (("flow", 500.0), ("epsilon", 5000.0), ("v", 5000.0)):
        assert dpo_beta(unset, types.SimpleNamespace(prediction=prediction)) == beta
    assert dpo_beta(DpoConfig(pairs="x", out="x", beta=42.0), types.SimpleNamespace(prediction="v")) == 42.0
    train_dpo(config(pairs, tmp_path / "run", max_steps=1, beta=None))
    assert yaml.safe_load((tmp_path / "run" / "train-dpo.yaml").read_text())["beta"] == 500.0


def test_cli_resume_under_another_lora_rank_is_one_line_and_keeps_the_checkpoint(pairs, cli, tmp_path):
    """``train-dpo`` rerun into a finished run's folder with another ``--lora-rank``: exit 2, one stderr line, and
    the checkpoint and metrics as they were (a torch size-mismatch dump before)."""
    args = ("train-dpo", "--pairs", pairs, "--out", tmp_path / "o", "--device", "cpu")
    code, _, err = cli(*args, "--max-steps", 1, "--lora-rank", 2)
    assert code == 0, err
    files = sorted(p for p in (tmp_path / "o").rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    code, _, err = cli(*args, "--max-steps", 2, "--lora-rank", 4)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "lora_rank 2 -> 4" in err, err
    assert {p: p.read_bytes() for p in files} == before


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_mode_the_umask_allows(pairs, tmp_path, umask):
    """Latents, manifests, configs and checkpoints (adapter, trainer state) get ``0o666 & ~umask``, as a plain
    ``open`` gives, not the 0600 of a private temporary file."""
    import os
    import stat

    previous = os.umask(umask)
    try:
        save_latent(tmp_path / "latent.safetensors", torch.zeros(2, 3), {})
        (tmp_path / "again").mkdir()
        write_pairs(tmp_path / "again")
        train_dpo(config(pairs, tmp_path / "out", max_steps=2, save_every=2))
    finally:
        os.umask(previous)
    written = [tmp_path / "latent.safetensors", tmp_path / "again" / "pairs.parquet"]
    written += [p for p in (tmp_path / "out").rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert any(p.name == "pytorch_lora_weights.safetensors" for p in written)
    assert any(p.name == "trainer_state.safetensors" for p in written)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))
