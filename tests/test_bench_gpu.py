"""benchmarks/bench_gpu.py: its FLOP count against torch's own counter, its per-case OOM handling, and the whole
script at ``--smoke`` size on the CPU, so it is known to run before it gets a GPU."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_forward_flops_match_torchs_flop_counter(bench):
    from diffusers import WanTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = bench.TINY["transformer"]
    torch.manual_seed(0)
    model = WanTransformer3DModel(**config).eval()
    shape, text_len = (16, 3, 8, 6), 7  # 3 x 4 x 3 video tokens against 7 text tokens
    x, text = torch.randn(1, *shape), torch.randn(1, text_len, config["text_dim"])
    # The math backend runs attention as batched matmuls, which the counter sees.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    linear, attention = bench.forward_flops(config, shape, text_len)
    assert linear == counts["aten.addmm"] + counts["aten.convolution"]
    assert attention == counts["aten.bmm"]


def test_published_1_3b_config_at_480p(bench):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    with torch.device("meta"):  # shapes only, no memory
        transformer = WanTransformer3DModel(**bench.WAN_1_3B["transformer"])
        vae = AutoencoderKLWan(**bench.WAN_1_3B["vae"])
    assert sum(p.numel() for p in transformer.parameters()) == 1_418_996_800  # "1.3B": 5.68 GB in float32
    assert 126e6 < sum(p.numel() for p in vae.parameters()) < 128e6  # Wan-VAE: 127M
    # 33 frames of 480x832: latent 16 x 9 x 60 x 104, 14,040 tokens; attention is about half of a forward
    linear, attention = bench.forward_flops(bench.WAN_1_3B["transformer"], (16, 9, 60, 104), 512)
    assert attention == 30 * 4 * (14_040**2 + 14_040 * 512) * 1536
    assert 0.45 < attention / (linear + attention) < 0.55
    dpo = bench.dpo_step_flops(bench.WAN_1_3B["transformer"], (16, 9, 60, 104), 512, pairs=1)
    assert dpo == 2 * (3 * linear + 4 * attention)


def test_peak_by_device_name(bench):
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA H200") == 989.4
    assert bench.peak_tflops("CPU (2 threads)") is None


def test_a_case_that_runs_out_of_memory_becomes_a_cell(bench):
    def too_big():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    cpu = torch.device("cpu")
    assert bench.isolated(too_big, cpu) == bench.OOM
    assert bench.isolated(lambda: 1.5, cpu) == 1.5
    with pytest.raises(ValueError):  # other errors are bugs, not figures
        bench.isolated(lambda: int("x"), cpu)


def test_only_rejects_unknown_parts(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--smoke", "--only", "sampling,speed"])
    assert bench.parse_args(["--smoke", "--only", "mfu, loop"]).parts == ["mfu", "loop"]


def test_smoke_run_prints_every_table(bench):
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    for heading in ("### Sampling", "### Training", "### Model FLOPs utilisation", "### `loop`"):
        assert heading in out
    assert "OOM" not in out
    lines = out.splitlines()

    def cells(label: str) -> list[str]:
        row = next(line for line in lines if line.startswith(f"| {label} |"))
        return [c.strip() for c in row.split("|")[2:-1]]

    for label in ("vpotool (`vpotool.sampling.sample` + decode)", "`WanPipeline`"):
        step, video, decode, memory = cells(label)
        assert 0 < float(step) < float(video) and memory == "n/a"  # no GPU memory on a CPU
    for method, label in bench.METHODS.items():
        seconds, memory, planned, seconds_checkpointing, memory_checkpointing, planned_checkpointing = cells(label)
        assert float(seconds) > 0 and float(seconds_checkpointing) > 0
        assert memory == memory_checkpointing == "n/a"
        assert (planned == planned_checkpointing == "-") if method == "lora" else float(planned) >= 0
    assert all(float(c) > 0 for c in cells("without gradient checkpointing")[:3])  # TFLOP, s, TFLOP/s
    assert "vpotool / WanPipeline:" in out and "loop overhead over its parts:" in out
