"""Memory options: prompts encoded once per run, the text encoder offloaded, the VAE decode recomputed in ReFL's
backward pass, the reward on its own device, and the diffusers VAE's tiling and slicing. Each gives the results
the plain run gives."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vpotool.models import load_backend
from vpotool.training.config import ReflConfig
from vpotool.training.refl import train_refl

PROMPTS = [
    "a red circle moving left slowly on a black background",
    "a blue square moving up quickly on a gray background",
]


def count_text_encoder_calls(backend) -> list[int]:
    calls = [0]
    backend.text_encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_condition_encodes_each_prompt_once_and_equals_encode_prompts():
    backend = load_backend("tiny", None, "cpu")
    calls = count_text_encoder_calls(backend)
    first = backend.condition([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    again = backend.condition([PROMPTS[1], PROMPTS[0]])
    assert calls[0] == 1  # one forward for the two distinct prompts, none for the second call
    direct = backend.encode_prompts(PROMPTS)
    torch.testing.assert_close(again["encoder_hidden_states"], direct["encoder_hidden_states"].flip(0))
    torch.testing.assert_close(first["encoder_hidden_states"][2], direct["encoder_hidden_states"][0])


def test_offloaded_text_encoder_serves_the_cache_and_encodes_new_prompts():
    """After offloading, the run's prompts come from the cache (no encoder call) and a new prompt is still encoded
    (with the encoder brought to the backend's device for the call and put back)."""
    backend = load_backend("tiny", None, "cpu")
    expected = backend.encode_prompts(PROMPTS)["encoder_hidden_states"]
    backend.offload_text_encoder(PROMPTS)
    calls = count_text_encoder_calls(backend)
    torch.testing.assert_close(backend.condition(PROMPTS)["encoder_hidden_states"], expected)
    assert calls[0] == 0
    backend.condition(["a green triangle moving down slowly on a white background"])
    assert calls[0] == 1 and next(backend.text_encoder.parameters()).device.type == "cpu"


def refl(tmp_path, name, **kw):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    base = dict(reward="world", max_steps=2, lr=1e-2, batch_size=2, frames=9, height=16, width=16, steps=3,
                guidance=1.0, lora_rank=2, device="cpu")  # fmt: skip
    train_refl(ReflConfig(prompts=str(tmp_path / "p.txt"), out=str(tmp_path / name), **{**base, **kw}))
    return load_file(str(tmp_path / name / "checkpoints" / "step-2" / "pytorch_lora_weights.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-4
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)


def test_refl_with_offload_and_reward_device_trains_the_same_adapter(tmp_path):
    assert_same(refl(tmp_path, "plain"), refl(tmp_path, "saving", offload_text_encoder=True, reward_device="cpu"))


def test_vae_checkpointing_recomputes_the_decoder_blocks_and_trains_the_same_adapter(tmp_path):
    """On a VAE with block checkpointing (CogVideoX's) the adapter is the plain run's; a VAE without it (the tiny
    model's Wan VAE) is refused in one line rather than checkpointed as one call, which saves nothing at the peak."""
    from families import make_tiny_checkpoint

    from vpotool.errors import VpoError
    from vpotool.models import load_backend as load
    from vpotool.training.refl import enable_vae_checkpointing

    folder = make_tiny_checkpoint("cogvideox", tmp_path / "cogvideox")
    family = dict(model="cogvideox", model_path=folder, reward="brightness")
    assert_same(refl(tmp_path, "plain", **family), refl(tmp_path, "ckpt", vae_checkpointing=True, **family))
    backend = load("cogvideox", folder)
    enable_vae_checkpointing(backend)
    assert backend.codec.vae.decoder.gradient_checkpointing
    with pytest.raises(VpoError, match="cannot recompute its blocks") as err:
        enable_vae_checkpointing(load("tiny"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("option", ["vae_tiling", "vae_slicing"])
def test_vae_tiling_and_slicing_are_model_options(option):
    """``--model-options vae_slicing=true`` switches the diffusers VAE's slicing on; decoding a small batch gives the
    same frames (tiling only starts above the VAE's tile size, larger than the tiny model's videos)."""
    plain = load_backend("tiny", None, "cpu")
    sliced = load_backend("tiny", None, "cpu", options=f"{option}=true")
    assert getattr(sliced.codec.vae, "use_" + option.removeprefix("vae_")) is True
    latents = torch.randn(2, *plain.latent_shape(9, 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sliced.decode(latents), plain.decode(latents), atol=1e-5, rtol=1e-4)
