"""CLIP-family rewards (clip, pickscore, aesthetic, hpsv2, background) on a tiny random CLIP built in code.

Scores are checked against hand computations with the in-memory model; HPSv2's open_clip -> transformers
conversion is checked against an independent functional open_clip forward written below.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from vpotool.errors import VpoError
from vpotool.rewards.base import Reward
from vpotool.rewards.clip import letterbox, load_aesthetic, load_background, load_clip, load_pickscore
from vpotool.rewards.hpsv2 import load_hpsv2
from vpotool.rewards.pretrained import CLIP_MEAN, CLIP_STD, normalize, resize_crop

WORDS = ["a", "red", "blue", "circle", "square", "moving", "left", "up", "on", "black", "background"]
PROMPTS = ["a red circle moving left", "a blue square moving up on a black background"]
HEADS, SIZE, PATCH = 4, 32, 8


def tiny_tokenizer():
    """A WordLevel tokenizer with <bos> ... <eos>; <eos> has the largest id, as CLIP's end token does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *WORDS, "<bos>", "<eos>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    ), vocab


def tiny_clip(vocab):
    from transformers import CLIPConfig, CLIPModel

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS)
    config = CLIPConfig(
        text_config=dict(
            **common, vocab_size=len(vocab), max_position_embeddings=16, hidden_act="gelu",
            bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"], pad_token_id=0,
        ),
        vision_config=dict(**common, image_size=SIZE, patch_size=PATCH, hidden_act="gelu"),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    return CLIPModel(config).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(folder, model)``: a tiny CLIP with its tokenizer saved in ``folder``; ``model`` is the in-memory copy."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    tokenizer, vocab = tiny_tokenizer()
    model = tiny_clip(vocab)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def videos(seed=0):
    return torch.rand(2, 4, 3, 24, 40, generator=torch.Generator().manual_seed(seed))


def pooled(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def hand_image(model, frames, resize="crop"):
    x = frames.flatten(0, 1)
    x = resize_crop(x, SIZE) if resize == "crop" else letterbox(x, SIZE)
    return pooled(model.get_image_features(pixel_values=normalize(x, CLIP_MEAN, CLIP_STD))).view(2, -1, 16)


@torch.no_grad()
def hand_text(model, folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)(PROMPTS, padding=True, return_tensors="pt")
    return pooled(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))


def hand_cosine(model, folder, frames, resize="crop"):
    img, txt = F.normalize(hand_image(model, frames, resize), dim=-1), F.normalize(hand_text(model, folder), dim=-1)
    return (img * txt[:, None]).sum(-1).mean(1)


def check_output(reward, out, dimension):
    assert isinstance(reward, Reward) and reward.differentiable
    assert reward.dimensions == (dimension, "overall") and set(out) == {dimension, "overall"}
    lo, hi = reward.score_range
    assert hi > lo
    for v in out.values():
        assert v.shape == (2,) and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert torch.equal(out[dimension], out["overall"])


def test_clip_score_by_hand(tiny):
    folder, model = tiny
    frames = videos()
    reward = load_clip(folder)
    with torch.no_grad():
        out = reward(frames, PROMPTS)
    check_output(reward, out, "clip_score")
    torch.testing.assert_close(out["clip_score"], hand_cosine(model, folder, frames), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # frames=2 scores the first and last frame
        two = load_clip(folder, frames=2)(frames, PROMPTS)["clip_score"]
    torch.testing.assert_close(two, hand_cosine(model, folder, frames[:, [0, 3]]), rtol=1e-5, atol=1e-5)


def test_pickscore_by_hand_and_tokenizer_fallback(tiny, tmp_path):
    folder, model = tiny
    frames = videos(1)
    reward = load_pickscore(folder)
    with torch.no_grad():
        out = reward(frames, PROMPTS)
    check_output(reward, out, "pickscore")
    expected = model.logit_scale.exp() * hand_cosine(model, folder, frames)
    torch.testing.assert_close(out["pickscore"], expected, rtol=1e-5, atol=1e-4)
    # a checkpoint folder without tokenizer files takes the tokenizer from the option
    bare = tmp_path / "pickscore"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(folder / f, bare / f)
    with torch.no_grad():
        again = load_pickscore(bare, tokenizer=str(folder))(frames, PROMPTS)["pickscore"]
    torch.testing.assert_close(again, out["pickscore"])


def published_head(dim, seed=0):
    """A random head with the key names and shapes of sac+logos+ava1-l14-linearMSE.pth (dim 768 there)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"layers.0": (1024, dim), "layers.2": (128, 1024), "layers.4": (64, 128), "layers.6": (16, 64)}
    shapes["layers.7"] = (1, 16)
    sd = {}
    for name, (o, i) in shapes.items():
        sd[f"{name}.weight"] = torch.randn(o, i, generator=g) / i**0.5
        sd[f"{name}.bias"] = torch.randn(o, generator=g) * 0.1
    return sd


def hand_aesthetic(model, frames, sd):
    x = F.normalize(hand_image(model, frames), dim=-1)
    for i in (0, 2, 4, 6, 7):  # no activations: the "linearMSE" head
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    return x.squeeze(-1).mean(1)


def test_aesthetic_head_loads_published_keys(tiny, tmp_path):
    from safetensors.torch import save_file

    folder, model = tiny
    frames = videos(2)
    sd = published_head(16)
    expected = hand_aesthetic(model, frames, sd)
    # (a) the head file itself, CLIP from option clip
    torch.save(sd, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    reward = load_aesthetic(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", clip=str(folder))
    with torch.no_grad():
        out = reward(frames, PROMPTS)
    check_output(reward, out, "aesthetic")
    torch.testing.assert_close(out["aesthetic"], expected, rtol=1e-5, atol=1e-5)
    # (b) a CLIP folder holding the head, as .pth or aesthetic*.safetensors
    for name in ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic_head.safetensors"):
        both = tmp_path / name.split(".")[0].replace("+", "_")
        shutil.copytree(folder, both)
        if name.endswith(".pth"):
            torch.save(sd, both / name)
        else:
            save_file(sd, both / name)
        with torch.no_grad():
            again = load_aesthetic(both)(frames, PROMPTS)["aesthetic"]
        torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)


def test_aesthetic_bad_heads(tiny, tmp_path):
    folder, _ = tiny
    wide = published_head(768)  # a real ViT-L/14 head on a CLIP with projection_dim 16
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(VpoError, match="768-wide"):
        load_aesthetic(tmp_path / "wide.pth", clip=str(folder))
    bent = published_head(16)
    bent["layers.2.weight"] = torch.zeros(64, 1024)
    torch.save(bent, tmp_path / "bent.pth")
    with pytest.raises(VpoError, match="not a LAION aesthetic head"):
        load_aesthetic(tmp_path / "bent.pth", clip=str(folder))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(VpoError, match="could not read"):
        load_aesthetic(tmp_path / "junk.pth", clip=str(folder))
    with pytest.raises(VpoError, match="exactly one head file"):
        load_aesthetic(folder)


# ---------------------------------------------------------------- HPSv2: open_clip checkpoints


def hf_to_openclip(hf: dict) -> dict:
    """The inverse of the converter, written independently: transformers CLIPModel names -> open_clip names."""
    top = {
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "logit_scale": "logit_scale",
    }
    oc = {new: hf[old] for old, new in top.items()}
    oc["visual.proj"] = hf["visual_projection.weight"].T.contiguous()
    oc["text_projection"] = hf["text_projection.weight"].T.contiguous()
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    block["self_attn.out_proj"] = "attn.out_proj"
    for tower, prefix in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        for i in range(2):
            src, dst = f"{tower}.encoder.layers.{i}.", f"{prefix}.resblocks.{i}."
            for a, b in block.items():
                for p in ("weight", "bias"):
                    oc[f"{dst}{b}.{p}"] = hf[f"{src}{a}.{p}"]
            for p in ("weight", "bias"):
                qkv = [hf[f"{src}self_attn.{n}_proj.{p}"] for n in "qkv"]
                oc[f"{dst}attn.in_proj_{p}"] = torch.cat(qkv, 0)
    return oc


def oc_blocks(sd, prefix, x, mask=None):
    """open_clip's ResidualAttentionBlock stack (nn.MultiheadAttention on [L, N, D], GELU MLP), functionally."""
    width, i = x.shape[-1], 0
    while f"{prefix}.resblocks.{i}.ln_1.weight" in sd:
        w = {k.split(f"resblocks.{i}.", 1)[1]: v for k, v in sd.items() if k.startswith(f"{prefix}.resblocks.{i}.")}
        h = F.layer_norm(x, (width,), w["ln_1.weight"], w["ln_1.bias"]).transpose(0, 1)
        a = F.multi_head_attention_forward(
            h, h, h, width, HEADS, w["attn.in_proj_weight"], w["attn.in_proj_bias"], None, None, False, 0.0,
            w["attn.out_proj.weight"], w["attn.out_proj.bias"], training=False, need_weights=False, attn_mask=mask,
        )[0]  # fmt: skip
        x = x + a.transpose(0, 1)
        h = F.layer_norm(x, (width,), w["ln_2.weight"], w["ln_2.bias"])
        h = F.gelu(F.linear(h, w["mlp.c_fc.weight"], w["mlp.c_fc.bias"]))
        x = x + F.linear(h, w["mlp.c_proj.weight"], w["mlp.c_proj.bias"])
        i += 1
    return x


def oc_encode_image(sd, pixels):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (x.shape[-1],), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = oc_blocks(sd, "visual.transformer", x)
    return (
        F.layer_norm(x[:, 0], (x.shape[-1],), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
        @ sd["visual.proj"]
    )


def oc_encode_text(sd, ids):
    n = ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:n]
    mask = torch.full((n, n), float("-inf")).triu(1)
    x = oc_blocks(sd, "transformer", x, mask)
    x = F.layer_norm(x, (x.shape[-1],), sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]


def test_hpsv2_conversion_matches_open_clip(tiny, tmp_path):
    from transformers import AutoTokenizer

    folder, model = tiny
    oc = hf_to_openclip(model.state_dict())
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {**oc, "attn_mask": torch.zeros(16, 16)}}, ckpt)
    reward = load_hpsv2(ckpt, config=str(folder), tokenizer=str(folder))
    # the converted model holds exactly the source weights and gives identical features
    ref = model.state_dict()
    got = reward.model.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    frames = videos(3)
    with torch.no_grad():
        out = reward(frames, PROMPTS)
        tok = AutoTokenizer.from_pretrained(folder)(PROMPTS, padding=True, return_tensors="pt")
        x = normalize(letterbox(frames.flatten(0, 1), SIZE), CLIP_MEAN, CLIP_STD)
        img = F.normalize(oc_encode_image(oc, x), dim=-1).view(2, 4, -1)
        txt = F.normalize(oc_encode_text(oc, tok["input_ids"]), dim=-1)
        converted_img = pooled(reward.model.get_image_features(pixel_values=x)).view(2, 4, -1)
    check_output(reward, out, "hpsv2")
    torch.testing.assert_close(F.normalize(converted_img, dim=-1), img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["hpsv2"], (img * txt[:, None]).sum(-1).mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["hpsv2"], hand_cosine(model, folder, frames, resize="pad"))
    # a folder holding the checkpoint, config.json and tokenizer loads the same
    both = tmp_path / "hps_folder"
    shutil.copytree(folder, both)
    shutil.copy(ckpt, both / ckpt.name)
    with torch.no_grad():
        torch.testing.assert_close(load_hpsv2(both)(frames, PROMPTS)["hpsv2"], out["hpsv2"])


def test_hpsv2_bad_checkpoints(tiny, tmp_path):
    folder, model = tiny
    oc = hf_to_openclip(model.state_dict())
    torch.save({"state_dict": {**oc, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)}}, tmp_path / "a.pt")
    with pytest.raises(VpoError, match="ls_1.gamma"):
        load_hpsv2(tmp_path / "a.pt", config=str(folder), tokenizer=str(folder))
    torch.save({"state_dict": oc}, tmp_path / "b.pt")
    with pytest.raises(VpoError, match="does not fit the CLIP config .*config wants"):  # default config: ViT-H-14
        load_hpsv2(tmp_path / "b.pt", tokenizer=str(folder))
    del oc["visual.ln_post.bias"]
    torch.save({"state_dict": oc}, tmp_path / "c.pt")
    with pytest.raises(VpoError, match="missing vision_model.post_layernorm.bias"):
        load_hpsv2(tmp_path / "c.pt", config=str(folder), tokenizer=str(folder))


def test_letterbox_keeps_aspect_and_pads_black():
    x = torch.ones(1, 3, 16, 32)
    y = letterbox(x, 32)
    assert y.shape == (1, 3, 32, 32)
    assert y[..., :8, :].abs().max() == 0 and y[..., 24:, :].abs().max() == 0
    torch.testing.assert_close(y[..., 8:24, :], torch.ones(1, 3, 16, 32))


# ---------------------------------------------------------------- background consistency, gradients, errors


def test_background_static_vs_random(tiny):
    folder, _ = tiny
    reward = load_background(folder)
    static = videos(4)[:, :1].expand(2, 6, 3, 24, 40)
    noise = torch.rand(2, 6, 3, 24, 40, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        still, jumpy = reward(static, PROMPTS), reward(noise, PROMPTS)
    check_output(reward, still, "background_consistency")
    torch.testing.assert_close(still["overall"], torch.ones(2), rtol=0, atol=1e-5)
    assert (jumpy["overall"] < still["overall"] - 1e-3).all()


def load_any(name, folder, model, tmp):
    """Each reward from the tiny CLIP; aesthetic and hpsv2 with their extra files written to ``tmp``."""
    if name == "aesthetic":
        torch.save(published_head(16), tmp / "head.pth")
        return load_aesthetic(tmp / "head.pth", clip=str(folder))
    if name == "hpsv2":
        torch.save({"state_dict": hf_to_openclip(model.state_dict())}, tmp / "hps.pt")
        return load_hpsv2(tmp / "hps.pt", config=str(folder), tokenizer=str(folder))
    loaders = {"clip": load_clip, "pickscore": load_pickscore, "background": load_background}
    return loaders[name](folder, frames=3)


@pytest.mark.parametrize("name", ["aesthetic", "background", "clip", "hpsv2", "pickscore"])
def test_gradients_reach_pixels(tiny, tmp_path, name):
    folder, model = tiny
    reward = load_any(name, folder, model, tmp_path)
    frames = videos(6).requires_grad_(True)
    reward(frames, PROMPTS)["overall"].sum().backward()
    assert frames.grad is not None and torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in reward.model.parameters())


def test_missing_paths_and_options(tiny, tmp_path):
    folder, _ = tiny
    nowhere = tmp_path / "nowhere"
    for load in (load_clip, load_pickscore, load_background, load_aesthetic, load_hpsv2):
        with pytest.raises(VpoError, match="nowhere"):
            load(nowhere)
    for load in (load_aesthetic, load_hpsv2):
        with pytest.raises(VpoError, match="needs --reward-path"):
            load(None)
    with pytest.raises(VpoError, match="known options: frames"):
        load_clip(folder, colour="red")
    with pytest.raises(VpoError, match="positive integer"):
        load_background(folder, frames=0)
    with pytest.raises(VpoError, match="no tokenizer"):
        load_pickscore(folder, tokenizer=str(nowhere))
