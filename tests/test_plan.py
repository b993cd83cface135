"""``vpotool plan``: the planner's peak memory against the CPU allocator's record of the same trainer step run for
real, the meta-device trace by hand, models built from configs alone, and the command line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vpotool.cli import app
from vpotool.gpus import parse_gpu
from vpotool.latents import save_latent
from vpotool.memtrace import allocator_peak, traced
from vpotool.prompts import load_prompts
from vpotool.stages.plan import plan_stage
from vpotool.training import dpo as D
from vpotool.training import refl as R
from vpotool.training import scst as S
from vpotool.training.common import setup
from vpotool.training.config import DpoConfig, ReflConfig, ScstConfig
from vpotool.training.reward import load_rollout_reward


def test_trace_counts_what_a_linear_layer_holds():
    """Weights, then the forward's saved tensors, then after backward exactly the gradients stay (by hand)."""
    lin = torch.nn.Linear(1024, 1024, device="meta")
    with traced() as trace:
        trace.adopt(lin.parameters(), "weights")
        assert trace.current == 1024 * 1024 * 4 + 4096  # weight + bias, float32, each a whole number of blocks
        x = torch.empty(8, 1024, device="meta", requires_grad=True)
        lin(x).relu().sum().backward()
        grads = 1024 * 1024 * 4 + 4096 + 8 * 1024 * 4  # weight, bias and input gradients
        assert trace.current == 2 * (1024 * 1024 * 4 + 4096) + 8 * 1024 * 4 + x.untyped_storage().nbytes()
        assert trace.totals["activations"] == grads + 8 * 1024 * 4
        assert trace.flops == 3 * 2 * 8 * 1024 * 1024  # forward, input and weight gradients


def test_attention_is_traced_as_flash_attention():
    """No L x L matrix: the attention of 4096 tokens holds its output and log-sum-exp, not 4096^2 scores."""
    q = torch.empty(1, 2, 4096, 64, device="meta", requires_grad=True)
    with traced() as trace:
        trace.mark()
        torch.nn.functional.scaled_dot_product_attention(query=q, key=q, value=q).sum().backward()
    matrix = 2 * 4096 * 4096 * 4
    assert trace.step_peak - trace.base < matrix / 10
    assert trace.flops == 4 * 2 * 4096 * 4096 * 64 * (1 + 2.5)  # torch's count for flash forward and backward


def pair_step(cfg, frames, height, width, tmp_path):
    """train-dpo's own step on stored latents (random ones: memory does not depend on values)."""
    trainer = setup(cfg)
    b = trainer.backend
    shape = b.latent_shape(frames, height, width)
    prompts = [p for _, p in load_prompts("world:align")][: cfg.batch_size]
    rows, files = [{"prompt": p} for p in prompts], []
    for i in range(len(prompts)):
        files.append(tuple(tmp_path / f"{i}{side}.safetensors" for side in "wl"))
        for f in files[-1]:
            save_latent(f, torch.randn(shape), {})
    b.condition(prompts)  # encoded before the step, as the planner's step starts with them encoded
    ref_mode = D.init_reference(trainer, cfg)
    return lambda: D.dpo_step(trainer, cfg, rows, files, 0, ref_mode)


def rollout_step(cfg, kind):
    """train-refl's or train-scst's own step on fresh rollouts."""
    from vpotool.sampling import resolved_settings, use_settings

    trainer = setup(cfg)
    b = trainer.backend
    reward = load_rollout_reward(cfg, b.device, need_grad=kind == "refl")
    settings = resolved_settings(cfg, b)
    use_settings(b, settings)
    prompts = [p for _, p in load_prompts(cfg.prompts)][: cfg.batch_size]
    b.condition(prompts)
    if kind == "refl":
        return lambda: R.refl_step(trainer, cfg, reward, prompts, settings, 0)

    def step():
        batches = S.fresh_batches(trainer, cfg, reward, prompts, settings, 0)
        ro = batches[0][0]
        sched = b.schedule(settings["steps"], tuple(ro.states[0].shape[1:])) if cfg.estimator == "logp" else None
        S.scst_update(trainer, cfg, batches, sched, settings, clipped=False)

    return step


SIZES = {"tiny": [(17, 32, 32), (17, 64, 64), (33, 64, 96)], "tiny-ar": [(17, 32, 32), (33, 32, 32), (33, 64, 64)]}


def measured_steps(model: str, kind: str, tmp_path) -> list[tuple]:
    """``[(config, extra size, measured bytes)]`` of each size: the trainer's own step run for real under the CPU
    allocator's record. Runs in a fresh process (see the test), so nothing an earlier test left in this one (a
    thread, a cache) enters the record."""
    out = []
    for n, (frames, height, width) in enumerate(SIZES[model]):
        run = tmp_path / f"run{n}"
        # batch 2: at batch 1 on the smallest sizes the CPU's convolution kernels' own buffers (a few MiB, which
        # the plan does not count, as it does not count cuDNN's workspace) are 10-20% of the step
        common = dict(out=str(run), model=model, batch_size=2, device="cpu", lora_rank=8)
        common["gradient_checkpointing"] = n == 2
        if kind == "dpo":
            cfg = DpoConfig(pairs="-", **common)
            run.mkdir()
            measured = allocator_peak(pair_step(cfg, frames, height, width, run))
            extra = {"frames": frames, "height": height, "width": width}
        else:
            video = dict(prompts="world:align", frames=frames, height=height, width=width, steps=2, reward="temporal")
            cfg = (ReflConfig if kind == "refl" else ScstConfig)(**common, **video)
            measured = allocator_peak(rollout_step(cfg, kind))
            extra = {}
        out.append((cfg, extra, measured))
    return out


# every trainer on the bidirectional tiny model; on tiny-ar the pair step and SCST's rollout step (the suite's time:
# ReFL through tiny-ar's rollout is planned by the same trace, and its check stays in bench_plan.py --validate)
@pytest.mark.parametrize(
    "model, kind", [("tiny", "dpo"), ("tiny", "refl"), ("tiny", "scst"), ("tiny-ar", "dpo"), ("tiny-ar", "scst")]
)
def test_plan_within_ten_percent_of_the_measured_step(model, kind, tmp_path):
    """The step's planned peak (over what is live when it starts) against the CPU allocator's record of the trainer's
    own step function run for real, at three sizes; gradient checkpointing at the largest."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        cases = pool.apply(measured_steps, (model, kind, tmp_path))
    for cfg, extra, measured in cases:
        planned = plan_stage(f"train-{kind}", cfg, extra, alternatives=False).step
        assert planned == pytest.approx(measured, rel=0.10), cfg.frames if kind != "dpo" else extra


def config_only(tmp_path):
    """The shipped tiny model's folder without its weights files: configs (and tokenizer) only."""
    from vpotool.models.tiny import ASSET_DIR

    folder = tmp_path / "configs"
    shutil.copytree(ASSET_DIR, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not list(folder.rglob("*.safetensors"))
    return folder


def test_weightless_build_matches_loading(tmp_path):
    """Built from configs alone, each part has the loaded model's parameters, shapes and dtypes (bf16 with the
    float32-kept modules), and the plan needs no weights file."""
    from vpotool.models import load_backend
    from vpotool.models.loading import without_weights

    with without_weights():
        planned = load_backend("wan", str(config_only(tmp_path)), "meta", "bfloat16")
    real = load_backend("tiny", None, "cpu", "bfloat16")
    for part in ("denoiser", "text_encoder"):
        a = {n: (t.shape, t.dtype) for n, t in getattr(planned, part).state_dict().items()}
        b = {n: (t.shape, t.dtype) for n, t in getattr(real, part).state_dict().items()}
        assert a == b
    assert all(p.device.type == "meta" for p in planned.denoiser.parameters())


def test_plan_command(tmp_path, capsys, monkeypatch):
    """`vpotool plan train-dpo` on a config-only folder: the JSON holds every part, a fit and each option's saving;
    gradient checkpointing saves memory, bf16 weights save the weights' half."""
    folder = config_only(tmp_path)
    monkeypatch.chdir(tmp_path)  # where a run folder would go: the plan fills in --out plan
    args = ["plan", "train-dpo", "--model", "wan", "--model-path", str(folder), "--frames", "17", "--height", "64",
            "--width", "64", "--gpu", "h100", "--json"]  # fmt: skip
    app(args, standalone_mode=False)
    plan = json.loads(capsys.readouterr().out)
    assert plan["peak"] == sum(plan["parts"].values())
    assert plan["gpu"]["fits"] == "fits" and plan["gpu"]["step_seconds"] > 0
    saves = {o["flag"]: o["saves"] for o in plan["options"]}
    assert saves["--gradient-checkpointing"] > 0
    assert saves["--dtype bfloat16"] >= 0.45 * plan["parts"]["weights"]  # the weights' half, and activations
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs"]  # plans write nothing


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu", "h1000"], "--gpu h1000: not a GPU vpotool knows"),
        (["--model", "wan", "--model-path", "/nonexistent/wan"], "model folder not found"),
        (["--lora-rank", "0"], "--lora-rank"),
        (["--model", "cogvideox", "--context-parallel", "2"], "no context-parallel plan"),
        (["--frames", "9", "--height", "40", "--width", "40", "--context-parallel", "2"], "do not split evenly"),
    ],
)
def test_plan_refusals_are_one_line(args, message, tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "vpotool", "plan", "train-dpo", *args], capture_output=True, text=True)
    assert run.returncode == 2
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_config_without_a_part_is_one_line(tmp_path):
    folder = config_only(tmp_path)
    (folder / "transformer" / "config.json").unlink()
    from vpotool.errors import VpoError

    with pytest.raises(VpoError, match="config.json"):
        plan_stage("train-dpo", DpoConfig(out="x", pairs="-", model="wan", model_path=str(folder)), alternatives=False)


def test_gpu_names_and_sizes():
    assert parse_gpu("H100").memory == 80 * 2**30
    assert parse_gpu("24GB").memory == 24 * 2**30 and parse_gpu("24GB").tflops is None


def test_exchanged_bytes_of_the_collectives_by_hand():
    """In a planning group of 4, an all-to-all sends 3/4 of its input (it keeps its own quarter), an all-gather its
    input to each of the 3 others."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    from vpotool.models.context_parallel import planning_group

    with planning_group(4):
        x = torch.zeros(8, 16)  # 512 bytes
        with traced() as trace:
            funcol.all_to_all_single(x, None, None, dist.group.WORLD).wait()
            funcol.all_gather_tensor(x, 0, dist.group.WORLD).wait()
    assert trace.exchanged == 384 + 3 * 512
    assert not dist.is_initialized()  # the planning group is gone with the plan


def test_context_parallel_plan_is_one_process_share(tmp_path):
    """Over 2 processes each holds about half the activations and does about half the FLOPs, with the same weights,
    and sends what the all-to-alls of its attention move; one process sends nothing."""
    folder = config_only(tmp_path)
    plans = {}
    for n in (1, 2):
        cfg = DpoConfig(out="x", pairs="-", model="wan", model_path=str(folder), context_parallel=n)
        plans[n] = plan_stage("train-dpo", cfg, {"frames": 17, "height": 64, "width": 64}, alternatives=False)
    one, two = plans[1], plans[2]
    assert one.exchanged == 0 and two.exchanged > 0 and two.context_parallel == 2
    assert two.parts["weights"] == one.parts["weights"]
    assert 0.4 < two.parts["activations"] / one.parts["activations"] < 0.75
    assert 0.4 < two.flops / one.flops < 0.75
