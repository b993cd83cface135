"""The Open-Sora 1.2 backend on a tiny random checkpoint: loading, shapes, the sign convention, the schedule, the
published parameter names, the CLI and one step of each trainer; and (with ``VPOTOOL_OPENSORA_SRC``) numerical
equivalence with the upstream modelling code."""

from __future__ import annotations

import math
import os
import sys
import types

import pytest
import torch
from families import _text_encoder

from vpotool.errors import VpoError
from vpotool.models import load_backend
from vpotool.models.opensora.stdit3 import STDiT3, STDiT3Config
from vpotool.models.opensora.vae import SDXL_VAE, OpenSoraVAE, OpenSoraVAEConfig

TEXT_LEN = 16
SIZE = (9, 32, 32)  # frames, height, width: 3 latent frames of 4 x 4
SIZE_ARGS = ["--frames", 9, "--height", 32, "--width", 32, "--steps", 2, "--device", "cpu"]
PROMPTS = ["a red circle moving left", "a blue square"]
TINY_DIT = dict(depth=2, hidden_size=32, num_heads=2, caption_channels=32, model_max_length=TEXT_LEN)
# the published image VAE's layout, narrowed: 8 channels per block, one layer each
TINY_SPATIAL = {**SDXL_VAE, "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 2}
TINY_VAE = dict(spatial=TINY_SPATIAL, filters=8, num_res_blocks=1, num_groups=2)


def make_tiny_opensora(folder, seed: int = 0) -> str:
    """Tiny random Open-Sora components saved in the ``--model-path`` layout vpotool documents."""
    from vpotool.models.tiny import build_tokenizer

    tokenizer = build_tokenizer(max_len=TEXT_LEN)
    torch.manual_seed(seed)
    STDiT3(STDiT3Config(**TINY_DIT)).save_pretrained(os.path.join(folder, "transformer"))
    OpenSoraVAE(OpenSoraVAEConfig(**TINY_VAE)).save_pretrained(os.path.join(folder, "vae"))
    _text_encoder("T5EncoderModel", len(tokenizer)).save_pretrained(os.path.join(folder, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    return str(folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_opensora(tmp_path_factory.mktemp("opensora"))


@pytest.fixture
def backend(folder):
    return load_backend("opensora", folder)


def test_load_shapes_and_conditioning(backend):
    assert backend.info.name == "opensora" and backend.prediction == "flow"
    assert backend.size_multiple == 16 and backend.defaults.steps == 30 and backend.defaults.guidance == 7.0
    shape = backend.latent_shape(*SIZE)
    assert shape == (4, 3, 4, 4)
    assert backend.latent_shape(51, 240, 432)[1] == 15 and backend.latent_shape(102, 240, 432)[1] == 30
    cond, uncond = backend.encode_prompts(PROMPTS), backend.encode_negative(2)
    assert cond["y"].shape == uncond["y"].shape == (2, TEXT_LEN, 32)
    assert cond["mask"].shape == uncond["mask"].shape == (2, TEXT_LEN) and cond["mask"][:, 0].all()
    assert torch.equal(uncond["y"][0], backend.denoiser.y_embedder.y_embedding)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        v = backend.predict(x, torch.tensor([900.0, 100.0]), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    with torch.no_grad():
        video = backend.decode(x)
        assert video.shape == (2, 9, 3, 32, 32) and video.min() >= 0 and video.max() <= 1
        assert backend.encode(video).shape == x.shape


def test_predict_returns_vpotool_velocity(backend):
    """A denoiser that answers Open-Sora's target ``x0 - noise`` exactly makes ``predict`` return ``noise - x0``,
    and the sampler's ``x0 = x_t - sigma * v`` recovers x0."""
    from vpotool.sampling import split_prediction

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 3, 4, 4, generator=g)
    sigma = torch.tensor([0.8, 0.3])
    x_t = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise

    class Oracle(torch.nn.Module):
        cfg = backend.denoiser.cfg

        def forward(self, x, timestep, y, **kw):
            assert torch.allclose(timestep, sigma * 1000)  # Open-Sora's t = 1000 * (1 - tau) = 1000 * sigma
            return torch.cat([x0 - noise, torch.zeros_like(x0)], dim=1)  # pred_sigma: 8 channels

    backend.denoiser = Oracle()
    v = backend.predict(x_t, sigma * 1000, {"y": None, "mask": None})
    assert torch.allclose(v, noise - x0)
    x0_hat, noise_hat = split_prediction(v, x_t, 1 - sigma.view(-1, 1, 1, 1, 1), sigma.view(-1, 1, 1, 1, 1), "flow")
    assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(noise_hat, noise, atol=1e-5)


def test_schedule_matches_open_sora_timestep_transform(backend):
    """Open-Sora 1.2's RFLOW grid (30 steps, use_timestep_transform) at 240p 9:16, 51 frames, by hand."""
    steps, (frames, height, width) = 30, (51, 240, 432)
    ratio = math.sqrt(height * width / 512**2) * math.sqrt(frames // 17 * 5)
    expected = []
    for i in range(steps):
        t = 1.0 - i / steps
        expected.append(ratio * t / (1 + (ratio - 1) * t) * 1000)
    sched = backend.schedule(steps, backend.latent_shape(frames, height, width))
    assert torch.allclose(sched.timesteps.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(sched.alphas, 1 - sched.sigmas) and sched.sigmas[-1] == 0 and sched.sigmas[0] == 1
    assert backend.schedule(4).timesteps.shape == (4,)
    t = backend.training_timesteps(64, torch.Generator().manual_seed(0))
    assert torch.allclose(t.alphas, 1 - t.sigmas) and ((t.sigmas > 0) & (t.sigmas < 1)).all()


def test_preset_sizes():
    from vpotool.models.opensora import preset_size

    assert preset_size("240p", "9:16") == (240, 432)
    assert preset_size("720p", "16:9") == (1280, 720)
    assert preset_size("480p", "1:1") == (640, 640)
    with pytest.raises(VpoError):
        preset_size("1080p", "9:16")


def test_size_flag_picks_a_preset_and_height_width_override_it(backend):
    from vpotool.config import SampleConfig
    from vpotool.sampling import resolved_settings

    def settings(**kw):
        s = resolved_settings(SampleConfig(prompts="p.txt", out="o", **kw), backend)
        return s["height"], s["width"]

    assert settings(size="240p") == backend.size_preset("240p:9:16") == (240, 432)
    assert settings(size="480p:16:9") == (848, 480)
    assert settings(size="480p:16:9", width=320) == (848, 320)
    assert settings() == (backend.defaults.height, backend.defaults.width)
    tiny = load_backend("tiny")
    with pytest.raises(VpoError, match="no size presets"):
        resolved_settings(SampleConfig(prompts="p.txt", out="o", size="240p"), tiny)


def test_missing_weights_raise_one_line_naming_the_downloads(tmp_path):
    for path in (tmp_path / "nowhere", None):
        with pytest.raises(VpoError) as err:
            load_backend("opensora", str(path) if path else None)
        msg = str(err.value)
        assert "\n" not in msg and "hpcai-tech/OpenSora-STDiT-v3" in msg and "DeepFloyd/t5-v1_1-xxl" in msg
    (tmp_path / "partial" / "transformer").mkdir(parents=True)
    with pytest.raises(VpoError) as err:
        load_backend("opensora", str(tmp_path / "partial"))
    assert "vae/" in str(err.value) and "\n" not in str(err.value)


# Published parameter names, derived from the upstream module structure (hpcaitech/Open-Sora v1.2.0,
# opensora/models/stdit/stdit3.py + layers/blocks.py; vae/vae.py + vae_temporal.py).

PUBLISHED_STDIT3_SHAPES = {
    "x_embedder.proj.weight": (1152, 4, 1, 2, 2),
    "x_embedder.proj.bias": (1152,),
    "t_embedder.mlp.0.weight": (1152, 256),
    "t_embedder.mlp.2.weight": (1152, 1152),
    "fps_embedder.mlp.0.weight": (1152, 256),
    "fps_embedder.mlp.2.bias": (1152,),
    "t_block.1.weight": (6912, 1152),
    "t_block.1.bias": (6912,),
    "y_embedder.y_proj.fc1.weight": (1152, 4096),
    "y_embedder.y_proj.fc2.weight": (1152, 1152),
    "y_embedder.y_embedding": (300, 4096),
    "rope.freqs": (36,),
    "spatial_blocks.0.scale_shift_table": (6, 1152),
    "spatial_blocks.0.attn.qkv.weight": (3456, 1152),
    "spatial_blocks.0.attn.qkv.bias": (3456,),
    "spatial_blocks.0.attn.q_norm.weight": (72,),
    "spatial_blocks.0.attn.k_norm.weight": (72,),
    "spatial_blocks.0.attn.proj.weight": (1152, 1152),
    "spatial_blocks.0.cross_attn.q_linear.weight": (1152, 1152),
    "spatial_blocks.0.cross_attn.kv_linear.weight": (2304, 1152),
    "spatial_blocks.0.cross_attn.proj.bias": (1152,),
    "spatial_blocks.0.mlp.fc1.weight": (4608, 1152),
    "spatial_blocks.0.mlp.fc2.weight": (1152, 4608),
    "temporal_blocks.0.cross_attn.kv_linear.weight": (2304, 1152),
    "temporal_blocks.27.attn.qkv.weight": (3456, 1152),
    "temporal_blocks.27.attn.k_norm.weight": (72,),
    "temporal_blocks.27.mlp.fc2.bias": (1152,),
    "temporal_blocks.27.scale_shift_table": (6, 1152),
    "final_layer.linear.weight": (32, 1152),
    "final_layer.linear.bias": (32,),
    "final_layer.scale_shift_table": (2, 1152),
}


def upstream_stdit3_keys(depth: int = 28, qk_norm: bool = True) -> set[str]:
    keys = {"rope.freqs", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.y_embedding"}
    keys |= {f"{m}.mlp.{i}.{p}" for m in ("t_embedder", "fps_embedder") for i in (0, 2) for p in ("weight", "bias")}
    keys |= {f"t_block.1.{p}" for p in ("weight", "bias")}
    keys |= {f"y_embedder.y_proj.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")}
    keys |= {"final_layer.scale_shift_table"} | {f"final_layer.linear.{p}" for p in ("weight", "bias")}
    linears = ["attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj"]
    linears += ["mlp.fc1", "mlp.fc2"]
    for kind in ("spatial_blocks", "temporal_blocks"):
        for i in range(depth):
            keys.add(f"{kind}.{i}.scale_shift_table")
            keys |= {f"{kind}.{i}.{lin}.{p}" for lin in linears for p in ("weight", "bias")}
            if qk_norm:
                keys |= {f"{kind}.{i}.attn.q_norm.weight", f"{kind}.{i}.attn.k_norm.weight"}
    return keys


def test_published_stdit3_names_and_shapes_load_strictly():
    with torch.device("meta"):
        model = STDiT3()
    assert set(model.state_dict()) == upstream_stdit3_keys()
    state = {k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}
    for name, shape in PUBLISHED_STDIT3_SHAPES.items():
        assert tuple(state[name].shape) == shape, name
    result = model.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def upstream_temporal_vae_keys() -> dict[str, tuple[int, ...]]:
    """``temporal_vae.*`` of VAE_Temporal_SD (filters 128, 4 res blocks, multipliers 1, 2, 2, 4) with shapes."""
    out = {}

    def conv(name, cin, cout, k, bias=True):
        out[f"{name}.conv.weight"] = (cout, cin, k, k, k)
        if bias:
            out[f"{name}.conv.bias"] = (cout,)

    def res(name, cin, cout):
        out.update({f"{name}.norm1.weight": (cin,), f"{name}.norm1.bias": (cin,)})
        out.update({f"{name}.norm2.weight": (cout,), f"{name}.norm2.bias": (cout,)})
        conv(f"{name}.conv1", cin, cout, 3, False)
        conv(f"{name}.conv2", cout, cout, 3, False)
        if cin != cout:
            conv(f"{name}.conv3", cin, cout, 1, False)

    mults, down = (1, 2, 2, 4), (False, True, True)
    conv("encoder.conv_in", 4, 128, 3, False)
    prev = 128
    for i, m in enumerate(mults):
        for j in range(4):
            res(f"encoder.block_res_blocks.{i}.{j}", prev, 128 * m)
            prev = 128 * m
        if i < 3 and down[i]:
            conv(f"encoder.conv_blocks.{i}", prev, prev, 3)
    for j in range(4):
        res(f"encoder.res_blocks.{j}", 512, 512)
    out.update({"encoder.norm1.weight": (512,), "encoder.norm1.bias": (512,)})
    conv("encoder.conv2", 512, 8, 1)
    conv("quant_conv", 8, 8, 1)
    conv("post_quant_conv", 4, 4, 1)
    conv("decoder.conv1", 4, 512, 3)
    for j in range(4):
        res(f"decoder.res_blocks.{j}", 512, 512)
    prev = 512
    for i in reversed(range(4)):
        for j in range(4):
            res(f"decoder.block_res_blocks.{i}.{j}", prev, 128 * mults[i])
            prev = 128 * mults[i]
        if i > 0 and down[i - 1]:
            conv(f"decoder.conv_blocks.{i - 1}", prev, prev * 2, 3)
    out.update({"decoder.norm1.weight": (128,), "decoder.norm1.bias": (128,)})
    conv("decoder.conv_out", 128, 4, 3)
    return {f"temporal_vae.{k}": v for k, v in out.items()}


def test_published_vae_names_and_shapes():
    from diffusers import AutoencoderKL

    from vpotool.models.opensora.vae import SDXL_VAE

    with torch.device("meta"):
        vae = OpenSoraVAE()
        spatial = AutoencoderKL(**SDXL_VAE)
    expected = upstream_temporal_vae_keys()
    expected |= {f"spatial_vae.module.{k}": tuple(v.shape) for k, v in spatial.state_dict().items()}
    expected |= {"scale": (1, 4, 1, 1, 1), "shift": (1, 4, 1, 1, 1)}
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == expected
    assert "spatial_vae.module.encoder.mid_block.attentions.0.to_q.weight" in expected


# The CLI and the trainers.


def test_sample_cli_writes_videos(cli, prompts_file, folder, tmp_path):
    import pandas as pd

    from vpotool.video import read_video

    run = tmp_path / "run"
    model = ["--model", "opensora", "--model-path", folder]
    code, _, err = cli("sample", "--prompts", prompts_file, "--out", run, "--candidates", 1, *model, *SIZE_ARGS)
    assert code == 0, err
    samples = pd.read_parquet(run / "samples.parquet")
    assert set(samples.model) == {"opensora"} and len(samples) == 2
    for row in samples.itertuples():
        assert read_video(run / row.video).shape[:3] == SIZE


def _lora_moved(out) -> bool:
    from safetensors.torch import load_file

    step = sorted((out / "checkpoints").glob("step-*"))[-1]
    weights = load_file(step / "pytorch_lora_weights.safetensors")
    return any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())  # B starts at 0


def test_train_dpo_refl_scst_one_step_each(cli, prompts_file, folder, tmp_path):
    from conftest import run_chain

    model = ["--model", "opensora", "--model-path", folder]
    run = tmp_path / "run"
    run_chain(cli, prompts_file, run, *model, *SIZE_ARGS)
    common = [*model, "--max-steps", 1, "--lr", 0.05, "--lora-rank", 2, "--device", "cpu"]
    code, _, err = cli("train-dpo", "--pairs", run / "pairs.parquet", "--out", tmp_path / "dpo", *common)
    assert code == 0, err
    assert _lora_moved(tmp_path / "dpo")
    size = ["--frames", 9, "--height", 32, "--width", 32, "--steps", 2, "--batch-size", 2]
    code, _, err = cli("train-refl", "--prompts", prompts_file, "--reward", "brightness", "--out", tmp_path / "refl",
                       "--guidance", 1.0, *size, *common)  # fmt: skip
    assert code == 0, err
    assert _lora_moved(tmp_path / "refl")
    code, _, err = cli("train-scst", "--prompts", prompts_file, "--reward", "brightness", "--out", tmp_path / "scst",
                       "--noise-level", 0.7, "--guidance", 1.0, *size, *common)  # fmt: skip
    assert code == 0, err
    assert _lora_moved(tmp_path / "scst")


# Numerical equivalence with upstream Open-Sora 1.2 (VPOTOOL_OPENSORA_SRC=checkout of tag v1.2.0).


def _stub_upstream_imports(monkeypatch):
    """Stand-ins for what upstream imports but this test does not exercise (colossalai, mmengine, timm's
    DropPath, flash-attn paths) and for xformers' block-diagonal attention, written naively per segment.
    einops and rotary_embedding_torch (0.5.3, as upstream pins) must be importable: they carry real maths."""
    pytest.importorskip("einops")
    pytest.importorskip("rotary_embedding_torch")

    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    class Mlp(torch.nn.Module):  # timm.models.vision_transformer.Mlp's structure and names
        def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=torch.nn.GELU, drop=0.0):
            super().__init__()
            self.fc1 = torch.nn.Linear(in_features, hidden_features or in_features)
            self.act = act_layer()
            self.fc2 = torch.nn.Linear(hidden_features or in_features, out_features or in_features)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class BlockDiagonalMask:
        def __init__(self, q_lens, kv_lens):
            self.q_lens, self.kv_lens = q_lens, kv_lens

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen):
            return cls(list(q_seqlen), list(kv_seqlen))

    def memory_efficient_attention(q, k, v, p=0.0, attn_bias=None):  # [1, M, H, D]
        if attn_bias is None:
            segs = [(0, q.shape[1], 0, k.shape[1])]
        else:
            qo = [0, *torch.tensor(attn_bias.q_lens).cumsum(0).tolist()]
            ko = [0, *torch.tensor(attn_bias.kv_lens).cumsum(0).tolist()]
            segs = [(qo[i], qo[i + 1], ko[i], ko[i + 1]) for i in range(len(attn_bias.q_lens))]
        outs = []
        for q0, q1, k0, k1 in segs:
            qs, ks, vs = (t[0, a:b].transpose(0, 1) for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
            w = (qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
            outs.append((w @ vs).transpose(0, 1))
        return torch.cat(outs)[None]

    class Registry:
        def __init__(self, *a, **k):
            pass

        def register_module(self, *a, **k):
            return lambda obj: obj

    ops = module("xformers.ops", memory_efficient_attention=memory_efficient_attention)
    ops.fmha = types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask)
    module("xformers", ops=ops)
    module("timm")
    module("timm.models")
    module("timm.models.layers", DropPath=torch.nn.Identity)
    module("timm.models.vision_transformer", Mlp=Mlp)
    module("opensora.registry", MODELS=Registry(), SCHEDULERS=Registry(), build_module=None)
    module("opensora.utils")
    module("opensora.utils.ckpt_utils", load_checkpoint=None)
    module("opensora.acceleration")
    module("opensora.acceleration.checkpoint", auto_grad_checkpoint=lambda block, *args: block(*args))
    module("opensora.acceleration.communications", all_to_all=None, gather_forward_split_backward=None,
           split_forward_gather_backward=None)  # fmt: skip
    module("opensora.acceleration.parallel_states", get_sequence_parallel_group=None)


def _load_upstream(src, monkeypatch, relpath, name):
    import importlib.util

    for pkg in ("opensora", "opensora.models", "opensora.models.layers", "opensora.models.stdit",
                "opensora.models.vae"):  # fmt: skip
        if pkg not in sys.modules or not hasattr(sys.modules[pkg], "__path__"):
            mod = types.ModuleType(pkg)
            mod.__path__ = [os.path.join(src, *pkg.split("."))]
            monkeypatch.setitem(sys.modules, pkg, mod)
    spec = importlib.util.spec_from_file_location(name, os.path.join(src, relpath))
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not os.environ.get("VPOTOOL_OPENSORA_SRC"), reason="set VPOTOOL_OPENSORA_SRC to a checkout")
def test_matches_upstream_stdit3_and_temporal_vae(monkeypatch):
    src = os.environ["VPOTOOL_OPENSORA_SRC"]
    _stub_upstream_imports(monkeypatch)
    _load_upstream(src, monkeypatch, "opensora/models/layers/blocks.py", "opensora.models.layers.blocks")
    up = _load_upstream(src, monkeypatch, "opensora/models/stdit/stdit3.py", "opensora.models.stdit.stdit3")
    upvae = _load_upstream(src, monkeypatch, "opensora/models/vae/vae_temporal.py", "opensora.models.vae.vae_temporal")

    torch.manual_seed(0)
    cfg = dict(depth=2, hidden_size=64, num_heads=4, caption_channels=48, model_max_length=10)
    theirs = up.STDiT3(up.STDiT3Config(**cfg, qk_norm=True)).eval()
    for p in theirs.parameters():  # upstream zero-initialises some layers; make every path count
        torch.nn.init.normal_(p, std=0.1)
    ours = STDiT3(STDiT3Config(**cfg)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)

    B, y = 2, torch.randn(2, 10, 48)
    x, t = torch.randn(B, 4, 3, 6, 8), torch.tensor([700.0, 150.0])
    mask = torch.tensor([[1] * 7 + [0] * 3, [1] * 10])
    fps, hw = torch.tensor([24.0]), (torch.tensor([48.0]), torch.tensor([64.0]))
    with torch.no_grad():
        ref = theirs(x, t, y[:, None], mask=mask, fps=fps, height=hw[0], width=hw[1])
        got = ours(x, t, y, mask=mask, fps=fps.expand(B), height=48, width=64)
    diff = (ref - got).abs().max().item()
    print(f"STDiT3 max abs difference vs upstream: {diff:.3e} (output scale {ref.abs().max():.2f})")
    assert ref.shape == got.shape == (B, 8, 3, 6, 8) and diff < 1e-4

    torch.manual_seed(1)
    kw = dict(filters=8, num_res_blocks=1, channel_multipliers=(1, 2, 2, 4), num_groups=2)
    tv_theirs = upvae.VAE_Temporal(**kw, temporal_downsample=(False, True, True)).eval()
    tv_ours = OpenSoraVAE(OpenSoraVAEConfig(spatial=TINY_SPATIAL, **kw)).temporal_vae.eval()
    tv_ours.load_state_dict(tv_theirs.state_dict(), strict=True)
    xz = torch.randn(1, 4, 7, 4, 4)
    with torch.no_grad():
        post = tv_theirs.encode(xz)
        mean, _ = tv_ours.encode(xz)
        rec_ref, rec = tv_theirs.decode(post.mean, num_frames=7), tv_ours.decode(mean, 7)
    vdiff = max((post.mean - mean).abs().max().item(), (rec_ref - rec).abs().max().item())
    print(f"temporal VAE max abs difference vs upstream: {vdiff:.3e}")
    assert rec.shape == rec_ref.shape == (1, 4, 7, 4, 4) and vdiff < 1e-5


def test_guidance_attends_the_null_caption_through_the_prompt_mask(backend):
    """Upstream Open-Sora's guided step gives the null caption the prompt's token mask; vpotool's sampler does the
    same (and the mask matters: attending every null token gives another output)."""
    from vpotool.sampling import guided_prediction

    cond = backend.encode_prompts(["a red circle", "a blue square moving up"])
    assert (cond["mask"].sum(1) < TEXT_LEN).all()  # both prompts are padded
    uncond = backend.encode_negative(2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *backend.latent_shape(*SIZE), generator=g)
    t = torch.tensor(700.0)
    with torch.no_grad():
        guided = guided_prediction(backend, x, t, cond, uncond, 7.0)
        tt = torch.full((2,), 700.0)
        raw_c = backend.predict(x, tt, cond)
        raw_u = backend.predict(x, tt, {"y": uncond["y"], "mask": cond["mask"]})
        all_tokens = backend.predict(x, tt, uncond)
    torch.testing.assert_close(guided, raw_u + 7.0 * (raw_c - raw_u), atol=1e-5, rtol=1e-4)
    assert (raw_u - all_tokens).abs().max() > 1e-4


def test_guidance_attends_a_negative_prompt_through_its_own_mask(backend):
    """A negative prompt is encoded as a prompt with its own token mask (upstream Open-Sora since v1.3, the first
    with negative prompts); only the null caption borrows the prompt's mask."""
    from vpotool.sampling import guided_prediction

    cond = backend.encode_prompts(["a red circle", "a blue square moving up"])
    uncond = backend.encode_negative(2, "blurry, low quality, static, distorted, ugly")
    assert not torch.equal(cond["mask"].sum(1), uncond["mask"].sum(1))  # other lengths than the prompts'
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *backend.latent_shape(*SIZE), generator=g)
    t = torch.tensor(700.0)
    with torch.no_grad():
        guided = guided_prediction(backend, x, t, cond, uncond, 7.0)
        tt = torch.full((2,), 700.0)
        raw_c = backend.predict(x, tt, cond)
        raw_u = backend.predict(x, tt, uncond)
        borrowed = backend.predict(x, tt, {"y": uncond["y"], "mask": cond["mask"]})
    torch.testing.assert_close(guided, raw_u + 7.0 * (raw_c - raw_u), atol=1e-5, rtol=1e-4)
    assert (raw_u - borrowed).abs().max() > 1e-4  # the mask matters


def fps_spy(backend) -> list:
    """The fps values the denoiser is conditioned on from now on, one per video and call."""
    seen = []
    backend.denoiser.register_forward_pre_hook(lambda _, args, kw: seen.extend(kw["fps"].tolist()), with_kwargs=True)
    return seen


@pytest.mark.parametrize(("frames", "fps", "expected"), [(1, 24, 120.0), (3, 24, 24.0), (9, 12, 12.0), (9, 24, 24.0)])
def test_sampling_conditions_on_the_video_fps_and_images_on_120(
    backend, prompts_file, tmp_path, frames, fps, expected
):
    """Upstream Open-Sora 1.2 (``prepare_multi_resolution_info``) conditions on the sampling fps, and on fps 120
    when the video is one pixel frame (an image); 2 to 4 frames (one latent frame) are a video."""
    from vpotool.config import SampleConfig
    from vpotool.stages.sample import run_sample

    seen = fps_spy(backend)
    size = dict(frames=frames, height=32, width=32, steps=2, fps=fps)
    run_sample(SampleConfig(prompts=str(prompts_file), out=str(tmp_path / "run"), **size), backend=backend)
    assert set(seen) == {expected}


def test_predict_without_sampling_settings_conditions_like_the_defaults(backend):
    """Called before any stage sets the video (``train-dpo`` on stored latents): one latent frame is an image."""
    seen = fps_spy(backend)
    cond = backend.encode_prompts(["a red circle"])
    with torch.no_grad():
        for frames in (1, 3):
            backend.predict(torch.zeros(1, 4, frames, 4, 4), torch.tensor([500.0]), cond)
    assert seen == [120.0, 24.0]


def test_trainers_condition_on_the_resolved_fps(backend, prompts_file, tmp_path):
    """train-scst's rollouts are conditioned as ``sample`` conditions the same settings: 3 frames (one latent
    frame) are a video at the model's fps."""
    from vpotool.training.config import ScstConfig
    from vpotool.training.scst import train_scst

    seen = fps_spy(backend)
    kw = dict(frames=3, height=32, width=32, steps=2, guidance=1.0, reward="brightness", max_steps=1, batch_size=2)
    train_scst(ScstConfig(prompts=str(prompts_file), out=str(tmp_path / "o"), lora_rank=2, **kw), backend=backend)
    assert set(seen) == {24.0}


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("A red circle moving left", "a red circle moving left aesthetic score: 6.5."),
        ("See https://example.com <b>A CAT</b> by @someone", "see a cat by aesthetic score: 6.5."),
        ("a dog, aesthetic score: 5.0.", "a dog, aesthetic score: 5.0."),
    ],
)
def test_prompts_get_upstreams_suffix_and_cleaning(backend, prompt, expected):
    """Open-Sora 1.2's inference rule: append " aesthetic score: 6.5." unless the prompt names a score, then the
    T5 cleaning (URLs, HTML tags and @names dropped, lower case, spaces collapsed); expected texts by hand."""
    assert backend.prompt_text(prompt) == expected


def test_model_options_switch_the_suffix_and_cleaning_off(folder):
    """``--model-options aesthetic_score=none,clean_prompts=false``: the raw prompt, lower-cased as upstream does
    without cleaning; the encoded text changes accordingly; a negative prompt never gets the suffix."""
    plain = load_backend("opensora", folder, options="aesthetic_score=none,clean_prompts=false")
    assert plain.prompt_text("  A <b>Red</b> circle ") == "a <b>red</b> circle"
    default = load_backend("opensora", folder)
    assert default.prompt_text("a red circle", suffix=False) == "a red circle"
    mask = lambda b, p: b.encode_prompts([p])["mask"].sum().item()  # noqa: E731
    assert mask(default, "a red circle") > mask(plain, "a red circle")  # the suffix's tokens
    negative = default.encode_negative(1, "a red circle")
    torch.testing.assert_close(negative["y"], plain.encode_prompts(["a red circle"])["y"])


def test_model_options_of_the_wrong_type_are_refused_and_booleans_read(folder):
    """A value of the wrong type is one line naming the option, not a traceback at the first prompt; yes/no,
    on/off and 1/0 are booleans."""
    for bad, expected in (("aesthetic_score=high", "a number or none"), ("clean_prompts=maybe", "true or false")):
        with pytest.raises(VpoError, match=f"--model-options: {bad.split('=')[0]} takes {expected}") as err:
            load_backend("opensora", folder, options=bad)
        assert "\n" not in str(err.value)
    for text in ("no", "off", "0", "False"):
        assert load_backend("opensora", folder, options=f"clean_prompts={text}").clean_prompts is False
    assert load_backend("opensora", folder, options="aesthetic_score=5").aesthetic_score == 5.0


def test_model_options_that_the_family_lacks_are_refused(folder):
    with pytest.raises(VpoError, match="has no option aesthetic; it takes aesthetic_score, clean_prompts"):
        load_backend("opensora", folder, options="aesthetic=6")
    with pytest.raises(VpoError, match="--model tiny has no option clean_prompts; it takes vae_slicing, vae_tiling"):
        load_backend("tiny", None, options="clean_prompts=false")


def test_a_folder_without_tokenizer_files_is_refused_in_one_line(folder, tmp_path):
    """Without ``tokenizer/`` the tokenizer is read from ``text_encoder/``, which holds no vocabulary: every word
    would become <unk>, so loading stops and names the files to add."""
    import shutil

    broken = tmp_path / "opensora"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(VpoError, match="maps every word to <unk>.*spiece.model") as err:
        load_backend("opensora", str(broken))
    assert "\n" not in str(err.value)
