"""Tiny random checkpoints of every model-based reward, saved as users would point ``--reward-path`` at them.

``save_tiny_reward(name, root) -> (reward_path, reward_options)``: the two flag values that load it through the
user path. The builders live in each reward's own test module; this file only lays them out on disk.
"""

from __future__ import annotations

from pathlib import Path

import torch

MODEL_REWARDS = ("videoscore", "clip", "pickscore", "aesthetic", "hpsv2", "background", "subject", "vjepa", "raft")


def _clip(root: Path) -> Path:
    from test_rewards_clip import tiny_clip, tiny_tokenizer

    folder = root / "clip"
    if not folder.exists():
        tokenizer, vocab = tiny_tokenizer()
        tiny_clip(vocab).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def save_tiny_reward(name: str, root: Path) -> tuple[str, str]:
    """Write a tiny random checkpoint for reward ``name`` under ``root``; returns ``--reward-path`` and
    ``--reward-options`` values for it."""
    root = Path(root)
    torch.manual_seed(0)
    if name in ("clip", "pickscore", "background"):
        return str(_clip(root)), ""
    if name == "aesthetic":
        from test_rewards_clip import published_head

        torch.save(published_head(16), root / "aesthetic-head.pth")
        return str(root / "aesthetic-head.pth"), f"aesthetic.clip={_clip(root)}"
    if name == "hpsv2":
        from test_rewards_clip import hf_to_openclip
        from transformers import CLIPModel

        clip = _clip(root)
        model = CLIPModel.from_pretrained(clip)
        torch.save({"state_dict": hf_to_openclip(model.state_dict())}, root / "HPS_v2.1_compressed.pt")
        return str(root / "HPS_v2.1_compressed.pt"), f"hpsv2.config={clip},hpsv2.tokenizer={clip}"
    if name == "videoscore":
        from test_rewards_videoscore import save_checkpoint

        (root / "videoscore").mkdir(exist_ok=True)
        save_checkpoint(root / "videoscore")
        return str(root / "videoscore"), ""
    if name == "subject":
        from test_rewards_features import TINY
        from transformers import Dinov2Config, Dinov2Model

        Dinov2Model(Dinov2Config(image_size=32, patch_size=8, **TINY)).save_pretrained(root / "dinov2")
        return str(root / "dinov2"), "subject.size=32"
    if name == "vjepa":
        from transformers import VJEPA2Config, VJEPA2Model

        config = VJEPA2Config(
            crop_size=32, patch_size=8, frames_per_clip=4, tubelet_size=2, hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, mlp_ratio=2.0, pred_hidden_size=16, pred_num_hidden_layers=1,
            pred_num_attention_heads=2,
        )  # fmt: skip
        VJEPA2Model(config).save_pretrained(root / "vjepa2")
        return str(root / "vjepa2"), ""
    if name == "raft":
        from vpotool.rewards.raft import RAFT

        torch.save({f"module.{k}": v for k, v in RAFT().state_dict().items()}, root / "raft-things.pth")
        return str(root / "raft-things.pth"), "raft.iters=2"
    if name in ("videoalign", "videoscore2", "unifiedreward-think"):
        return recorded_judge(name, root)
    raise ValueError(f"no tiny checkpoint for reward {name}")


def recorded_judge(name: str, root: Path, answering: bool = True) -> tuple[str, str]:
    """The tiny Qwen-VL folders of tests/data for the VLM rewards and the pairwise judge, with upstream's prompt text
    cut from the query their reference recorded (vpotool carries no copy), as path and options. The generating
    ones are the folders ``examples/tiny_judges/train.py`` taught to answer in their format (``answering``), or
    the random ones, which never stop (24 new tokens)."""
    import json

    data = Path(__file__).parent / "data"
    if name == "videoalign":
        meta = json.loads((data / "videoalign_reference.json").read_text())
        folder, query, prompt, placeholder = "videoalign_tiny", meta["texts"][0], meta["prompts"][0], "{text_prompt}"
    elif name == "videoscore2":
        meta = json.loads((data / "videoscore2_reference.json").read_text())
        folder, query, prompt, placeholder = "videoscore2_tiny", meta["videos"][0]["query"], meta["prompts"][0], \
            "$t2v_prompt"  # fmt: skip
    else:
        meta = json.loads((data / "unifiedreward_reference.json").read_text())
        folder, query, prompt, placeholder = "videoscore2_tiny", meta["runs"][0]["query"], meta["prompt"], "{prompt}"
    body = query.rsplit("<|vision_end|>", 1)[1].rsplit("<|im_end|>\n<|im_start|>assistant\n", 1)[0]
    template = root / f"{name}-prompt.txt"
    template.write_text(body.replace(prompt, placeholder))
    prefix = "" if name == "unifiedreward-think" else f"{name}."  # a judge's options are its own
    options = f"{prefix}prompt_template={template}"
    if name != "videoalign":
        trained = {"videoscore2": "videoscore2_answering", "unifiedreward-think": "unifiedreward_answering"}[name]
        folder = trained if answering else folder
        options += f",{prefix}max_new_tokens={300 if answering else 24}"
    return str(data / folder), options
