"""HPSv2 / HPSv2.1 (Human Preference Score v2): an open_clip ViT-H-14 checkpoint, converted here to a transformers
``CLIPModel`` because open_clip (which needs torchvision) is not a dependency.

The score is the cosine between the normalised image and text features, as in the ``hpsv2`` package's
``img_score.score`` (``diag(image_features @ text_features.T)`` with open_clip's normalised outputs), mean over
frames. The package evaluates letterboxed images (``ResizeMaxSize``: long side to 224, black padding); that is the
default here too.
"""

from __future__ import annotations

import glob
import os
import re

import torch

from vpotool.errors import VpoError, first_line
from vpotool.rewards.clip import (
    DEFAULT_FRAMES,
    AlignmentReward,
    has_tokenizer,
    load_tokenizer,
)
from vpotool.rewards.pretrained import check_options, freeze, read_state_dict

# open_clip's ViT-H-14 was trained with this tokenizer's BPE vocabulary (the same as OpenAI CLIP's).
HPSV2_TOKENIZER_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
WHAT = "HPS_v2_compressed.pt or HPS_v2.1_compressed.pt (hub xswu/HPSv2)"

# open_clip name -> transformers CLIPModel name, outside the transformer blocks. Checked against open_clip's
# model.py / transformer.py (CLIP, VisionTransformer, TextTransformer; the copy vendored in tgxs002/HPSv2) and
# transformers' convert_clip_original_pytorch_to_hf.py, which maps the same OpenAI-style names.
_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",  # [width, dim] parameter used as x @ proj: transposed
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",  # likewise transposed
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj", "text_projection"}
# inside a residual block ("[visual.]transformer.resblocks.N.")
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_SKIPPED = {"attn_mask"}  # a buffer older open_clip versions saved; transformers builds its own causal mask


def openclip_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip ViT CLIP state dict (OpenAI-style names) to transformers ``CLIPModel`` names.

    ``visual.proj`` and ``text_projection`` are transposed (open_clip multiplies ``x @ proj``, transformers uses a
    bias-free ``Linear``); each ``attn.in_proj_weight/bias`` ``[3 * width, ...]`` splits in order into
    ``q_proj``, ``k_proj``, ``v_proj``. Keys it does not know (LayerScale, attention pooling, custom text towers)
    raise ``ValueError`` naming the first: such models do not fit ``CLIPModel``.
    """
    out, unknown = {}, []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key in _SKIPPED:
            continue
        if key in _TOP:
            out[_TOP[key]] = value.t().contiguous() if key in _TRANSPOSED else value
            continue
        m = _RESBLOCK.match(key.replace(".in_proj_", ".in_proj."))  # in_proj_weight -> in_proj.weight
        if not m or (m.group(3) not in _BLOCK and m.group(3) != "attn.in_proj"):
            unknown.append(key)
            continue
        tower = "vision_model" if m.group(1) else "text_model"
        prefix, module, param = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3), m.group(4)
        if module == "attn.in_proj":
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}self_attn.{name}.{param}"] = part.contiguous()
        else:
            out[f"{prefix}{_BLOCK[module]}.{param}"] = value
    if unknown:
        raise ValueError(f"{len(unknown)} open_clip keys have no CLIPModel counterpart, e.g. {unknown[0]}")
    return out


def vit_h14_config():
    """``CLIPConfig`` of open_clip's ViT-H-14 (model_configs/ViT-H-14.json: embed 1024; vision width 1280, 32
    layers, head width 80, patch 14, image 224; text width 1024, 16 heads, 24 layers, context 77, vocab 49408).

    open_clip builds it with ``nn.GELU`` (not QuickGELU) and LayerNorm eps 1e-5, hence ``hidden_act="gelu"``.
    """
    from transformers import CLIPConfig

    text = dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", layer_norm_eps=1e-5,
    )  # fmt: skip
    vision = dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
        image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5,
    )  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024)


def _checkpoint_file(path: str) -> str:
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "*.pt")))
    preferred = [f for f in found if os.path.basename(f).startswith("HPS_v2")]
    if len(preferred) == 1 or len(found) == 1:
        return (preferred or found)[0]
    listed = ", ".join(os.path.basename(f) for f in found) or "none"
    raise VpoError(
        f"reward hpsv2: {path} must hold one .pt checkpoint (found {listed}); pass the {WHAT} file as --reward-path"
    )


def _config(option, folder):
    from transformers import CLIPConfig

    where = option
    if where is None and folder and os.path.isfile(os.path.join(folder, "config.json")):
        where = folder
    if where is None:
        return vit_h14_config()
    try:
        return CLIPConfig.from_pretrained(where)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = first_line(e)
        raise VpoError(f"reward hpsv2: could not read a CLIPConfig from {where}: {first}; fix option config") from e


def _check_fits(converted: dict, config, ckpt: str) -> None:
    """Names and shapes of the converted weights against ``CLIPModel(config)`` (built on the meta device, so free);
    any difference is one ``VpoError`` line naming the first (wrong shapes first: they hint at the config)."""
    from transformers import CLIPModel

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CLIPModel(config).state_dict().items()}
    wrong = {k: tuple(v.shape) for k, v in converted.items() if k in shapes and tuple(v.shape) != shapes[k]}
    bad = [f"{k} is {shape}, config wants {shapes[k]}" for k, shape in wrong.items()]
    bad += [f"missing {k}" for k in shapes if k not in converted]
    bad += [f"unexpected {k}" for k in converted if k not in shapes]
    if bad:
        raise VpoError(
            f"reward hpsv2: {ckpt} does not fit the CLIP config ({len(bad)} problems, e.g. {bad[0]}); pass option "
            f"config with the checkpoint's architecture (default: open_clip ViT-H-14)"
        )


def load_hpsv2(path: str | None = None, device="cpu", dtype=torch.float32, **options) -> AlignmentReward:
    """HPSv2 / v2.1: cosine of normalised image and text features from the converted checkpoint, mean over frames.

    ``path``: the ``.pt`` checkpoint (HPS_v2_compressed.pt, HPS_v2.1_compressed.pt: ``{"state_dict": ...}`` of an
    open_clip ViT-H-14), or a folder holding it, optionally with a ``config.json`` (a ``CLIPConfig``) and tokenizer
    files. Options: ``frames`` (default 8); ``config`` (a ``CLIPConfig`` folder or json; default the folder's
    config.json, else ViT-H-14); ``tokenizer`` (default the folder when it holds one, else
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); ``resize`` ("pad", the hpsv2 package's letterbox, or "crop").
    Scores are about 0.2-0.35 (often reported x100).
    """
    from transformers import CLIPModel

    from vpotool.models.loading import quiet_loading

    known = {"frames": DEFAULT_FRAMES, "config": None, "tokenizer": None, "resize": "pad"}
    opts = check_options("hpsv2", options, known)
    if opts["resize"] not in ("pad", "crop"):
        raise VpoError(f"reward hpsv2: option resize must be 'pad' or 'crop'; got {opts['resize']!r}")
    if not path:
        raise VpoError(f"reward hpsv2 needs --reward-path: {WHAT}, or a folder holding it")
    path = str(path)
    if not os.path.exists(path):
        raise VpoError(f"reward hpsv2: no checkpoint at {path}; download {WHAT} and pass it with --reward-path")
    folder = path if os.path.isdir(path) else None
    ckpt = _checkpoint_file(path)
    config = _config(opts["config"], folder)
    try:
        converted = openclip_to_hf(read_state_dict(ckpt, "hpsv2", WHAT))
    except ValueError as e:
        raise VpoError(f"reward hpsv2: {ckpt} is not an open_clip ViT CLIP checkpoint: {e}") from e
    _check_fits(converted, config, ckpt)
    quiet_loading()
    try:
        model = CLIPModel.from_pretrained(None, config=config, state_dict=converted, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        first = first_line(e)
        raise VpoError(f"reward hpsv2: could not build CLIPModel from {ckpt}: {first[:200]}") from e
    model = freeze(model.to(device))
    folder_tok = folder if folder and has_tokenizer(folder) else None
    candidates = [opts["tokenizer"]] if opts["tokenizer"] else [folder_tok, HPSV2_TOKENIZER_ID]
    tokenizer = load_tokenizer("hpsv2", candidates)
    return AlignmentReward(
        "hpsv2", "hpsv2", model, tokenizer, opts["frames"], score_range=(0.2, 0.35), resize=opts["resize"]
    )
