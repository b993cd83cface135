"""Reference rewards of VideoAlign's own inference (``VideoVLMRewardInference``) on a tiny random VideoReward, for
``tests/test_rewards_videoalign.py`` (which then needs no VideoAlign checkout).

    pip install --no-deps --target /tmp/vadeps transformers==4.45.2 tokenizers==0.20.0 huggingface-hub==0.23.2 \
        trl==0.8.6 peft==0.10.0 accelerate==0.34.0 decord==0.6.0 datasets==2.19.2 torchvision==0.28.0 \
        multiprocess==0.70.16 dill==0.3.8 xxhash fsspec==2024.3.1 pyarrow_hotfix aiohttp aiosignal frozenlist \
        multidict yarl attrs aiohappyeyeballs propcache
    PYTHONPATH=/tmp/vadeps python examples/videoalign/make_reference.py --upstream /path/to/VideoAlign

The versions are those of VideoAlign's ``environment.yaml`` (transformers 4.45.2, peft 0.10, trl 0.8.6, decord),
except torchvision, which must match the installed torch. The script

1. writes a tiny Qwen2-VL base model (2 decoder layers of width 32, a one-block vision tower of width 16, a
   byte-level BPE tokenizer of 320 tokens with Qwen2-VL's special tokens and chat template)
   to ``videoalign_tiny/base``;
2. writes ``videoalign_tiny/model_config.json`` as the checkout's training script does (its ``DataConfig``,
   ``ModelConfig``, ``PEFTLoraConfig`` with the settings of its ``train.sh``: special reward tokens, three heads,
   LoRA on the language model, ``detailed_special`` prompt, 2 fps) plus an ``inference_config`` of head means/stds;
3. builds the reward model with the checkout's ``create_model_and_processor``, draws every trainable weight
   (LoRA A and B, vision tower, merger, reward head, token embeddings) from a seed, and saves
   ``checkpoint-3/`` as its trainer does: the peft adapter plus ``non_lora_state_dict.pth``;
4. writes two small synthetic videos as mp4 (``vpotool.video.write_video``), scores them with
   ``VideoVLMRewardInference(videoalign_tiny)`` (raw and normalised), and records the frames it decoded (decord),
   the frame indices it kept, the resized frame size, the prompt text, token ids and pixel values.

What is replaced to run it on a CPU, and why (nothing else of the scoring path is touched):
- attention: the inference class asks for flash-attention 2; here ``create_model_and_processor`` is called with
  ``disable_flash_attn2=True`` (sdpa), in float32 on the CPU;
- torchvision's compiled ops do not load against a CPU-only torch; the script declares the two op schemas
  (``nms``, ``qnms``) that torchvision registers fake kernels for, so that it imports (no op of it runs);
- ``non_lora_state_dict.pth`` is written with the expression of the checkout's
  ``get_peft_state_non_lora_maybe_zero_3`` (its helper imports deepspeed, which is not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
SEED = 0
FOLDER = "videoalign_tiny"
STEP = 3
# Qwen2-VL-Instruct's chat template (its tokenizer's), which upstream renders the query with
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
PROMPTS = ["a red ball rolls to the left", "two cats play in the snow at night"]
NORM = {"VQ_mean": 0.25, "VQ_std": 2.0, "MQ_mean": -0.5, "MQ_std": 0.5, "TA_mean": 1.0, "TA_std": 4.0}


def shim_torchvision() -> None:
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    shim_torchvision.lib = lib  # keep the library alive


def tiny_base(path: Path, upstream: Path) -> None:
    """A random tiny Qwen2-VL with a BPE tokenizer trained on the upstream prompt text and the test prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Qwen2TokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )

    corpus = [(upstream / "prompt_template.py").read_text(), *PROMPTS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
        additional_special_tokens=SPECIAL[1:], chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    processor = Qwen2VLProcessor(Qwen2VLImageProcessor(), tokenizer, chat_template=CHAT_TEMPLATE)
    config = Qwen2VLConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(SEED)
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)


def write_model_config(folder: Path) -> None:
    from data import DataConfig
    from utils import ModelConfig, PEFTLoraConfig

    data = DataConfig(
        max_frame_pixels=8000, fps=2.0, eval_dim=["VQ", "MQ", "TA"], prompt_template_type="detailed_special",
        sample_type="uniform", use_tied_data=True,
    )  # fmt: skip
    model = ModelConfig(
        model_name_or_path="base", output_dim=3, use_special_tokens=True, reward_token="special",
        torch_dtype="float32", loss_type="btt", tune_merger=True,
    )  # fmt: skip
    lora = PEFTLoraConfig(
        lora_enable=True,
        lora_r=4,
        lora_alpha=8,
        lora_namespan_exclude=["lm_head", "rm_head", "embed_tokens", "visual"],
    )
    config = {
        "data_config": asdict(data),
        "training_args": {"output_dir": "rm_output", "bf16": False},
        "model_config": asdict(model),
        "peft_lora_config": asdict(lora),
        "inference_config": NORM,
    }
    (folder / "model_config.json").write_text(json.dumps(config, indent=4))


def cpu_training_args(**kw):
    from utils import TrainingConfig

    return TrainingConfig(output_dir="", disable_flash_attn2=True, gradient_checkpointing=False, **kw)


def save_checkpoint(folder: Path) -> None:
    """The trained reward model as the checkout's trainer saves it: peft adapter plus the non-LoRA trainables."""
    import inference
    from train_reward import create_model_and_processor

    data, _, model_cfg, lora_cfg, _ = inference.load_configs_from_json(folder / "model_config.json")
    model, _, _ = create_model_and_processor(
        model_config=inference.ModelConfig(**model_cfg),
        peft_lora_config=inference.PEFTLoraConfig(**lora_cfg),
        training_args=cpu_training_args(),
    )
    inner = model.model  # as train_reward.py configures trainables under LoRA
    inner.visual.requires_grad_(True)
    inner.visual.merger.requires_grad_(True)
    inner.rm_head.requires_grad_(True)
    model.get_input_embeddings().requires_grad_(True)  # the special-token rows are trained (special_token_lr)
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "lora_" in name else 0.1))
    out = folder / f"checkpoint-{STEP}"
    model.save_pretrained(out)
    non_lora = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" not in k and v.requires_grad}
    torch.save(non_lora, out / "non_lora_state_dict.pth")


def synthetic_videos() -> list[tuple[np.ndarray, int]]:
    """Two small uint8 ``[T, H, W, 3]`` videos with their fps: one downscaled to the pixel budget, one upscaled to
    the minimum pixel count."""
    rng = np.random.default_rng(SEED)
    t = np.arange(8)[:, None, None]
    y, x = np.mgrid[0:84, 0:112]
    a = np.stack([(x * 3 + t * 7) % 256, (y * 4 + t * 5) % 256, (x + y + t * 11) % 256], -1).astype(np.uint8)
    b = rng.integers(0, 256, size=(9, 28, 28, 3), dtype=np.uint8)
    return [(a, 8), (b, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", required=True, help="a VideoAlign checkout (github KwaiVGI/VideoAlign)")
    ap.add_argument("--out", default=str(ROOT / "tests" / "data"), help="where the tiny folder and reference go")
    args = ap.parse_args()
    upstream = Path(args.upstream).resolve()
    out = Path(args.out).resolve()
    folder = out / FOLDER
    os.environ["FORCE_QWENVL_VIDEO_READER"] = "decord"
    shim_torchvision()
    sys.path.insert(0, str(upstream))
    sys.path.insert(0, str(ROOT))
    import decord
    import inference
    from safetensors.torch import save_file

    from vpotool.video import write_video

    folder.mkdir(parents=True, exist_ok=True)
    tiny_base(folder / "base", upstream)
    write_model_config(folder)
    os.chdir(folder)  # model_name_or_path "base" is relative, as a path on the command line would be
    save_checkpoint(folder)

    original = inference.create_model_and_processor

    def create_on_cpu(model_config, peft_lora_config, training_args, **kw):
        training_args.disable_flash_attn2 = True  # flash-attention 2 -> sdpa
        return original(model_config, peft_lora_config, training_args, **kw)

    inference.create_model_and_processor = create_on_cpu
    scorer = inference.VideoVLMRewardInference(str(folder), device="cpu", dtype=torch.float32)

    kept: list[list[int]] = []
    get_batch = decord.VideoReader.get_batch

    def record_batch(self, idx):
        kept.append(list(idx))
        return get_batch(self, idx)

    decord.VideoReader.get_batch = record_batch
    texts: list[str] = []
    render = scorer.processor.apply_chat_template

    def record_text(*a, **kw):
        texts.extend(render(*a, **kw))
        return texts[-len(a[0]) :]

    scorer.processor.apply_chat_template = record_text

    tensors, meta = {}, {"prompts": PROMPTS, "videos": []}
    paths = []
    for i, (video, fps) in enumerate(synthetic_videos()):
        path = out / f"videoalign_{i}.mp4"
        write_video(path, video, fps)
        decoded = decord.VideoReader(str(path))
        tensors[f"frames_{i}"] = torch.from_numpy(decoded.get_batch(list(range(len(decoded)))).asnumpy()).contiguous()
        meta["videos"].append({"fps": decoded.get_avg_fps()})
        paths.append(str(path))
    with torch.no_grad():
        for i, path in enumerate(paths):  # one at a time: each video its own frame count and size
            batch = scorer.prepare_batch([path], [PROMPTS[i]])
            tensors[f"input_ids_{i}"] = batch["input_ids"][0].contiguous()
            pixels = batch["pixel_values_videos"]
            tensors[f"pixel_values_head_{i}"] = pixels[:8].contiguous()
            tensors[f"pixel_values_sum_{i}"] = pixels.double().sum(1)
            grid = batch["video_grid_thw"][0].tolist()
            meta["videos"][i].update(grid_thw=grid, size=[grid[1] * 14, grid[2] * 14])
        kept.clear()
        texts.clear()
        rewards = {
            "raw": scorer.reward(paths, PROMPTS, use_norm=False),
            "norm": scorer.reward(paths, PROMPTS, use_norm=True),
        }
    meta["frame_indices"] = kept[:2]
    meta["texts"] = texts[:2]
    for kind, rows in rewards.items():
        for key in ("VQ", "MQ", "TA", "Overall"):
            tensors[f"{kind}_{key}"] = torch.tensor([r[key] for r in rows], dtype=torch.float64)
    for path in paths:
        os.remove(path)
    save_file(tensors, str(out / "videoalign_reference.safetensors"))
    (out / "videoalign_reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    print({k: [round(v, 6) for v in t.tolist()] for k, t in tensors.items() if k[:3] in ("raw", "nor")})


if __name__ == "__main__":
    main()
