"""Reference outputs of VideoScore2's own inference (``vs2_inference.py``) on a tiny Qwen2.5-VL taught to answer
in its format, for ``tests/test_rewards_videoscore2.py`` (which then needs no VideoScore2 checkout).

    pip install --no-deps --target /tmp/vs2deps transformers==4.53.2 tokenizers==0.21.4 huggingface-hub==0.34.4 \
        qwen-vl-utils==0.0.14 decord==0.6.0 torchvision==0.28.0 safetensors av
    PYTHONPATH=/tmp/vs2deps python examples/videoscore2/make_reference.py --upstream /path/to/VideoScore2 \
        --model tests/data/videoscore2_answering

Without ``--model`` it first writes the tiny random ``videoscore2_tiny`` (step 1) and judges with that; the
references in tests/data are made with ``--model tests/data/videoscore2_answering``, the random folder taught by
``examples/tiny_judges/train.py`` to answer in VideoScore2's format: its answers and soft scores move with the
video's positions (a random model's do not, so it cannot tell a right 3-D M-RoPE from a wrong one).

transformers 4.53.2 is the version VideoScore2's model card installs; qwen-vl-utils is unpinned there (0.0.14 is
the newest); torchvision must match the installed torch. The script

1. writes a tiny random Qwen2.5-VL (2 decoder layers of width 32, a one-block vision tower of width 16, a
   byte-level BPE tokenizer of 320 tokens with Qwen2's pre-tokenizer, special tokens and chat template; a
   generation config with a repetition penalty, so that the scores read are the processed ones) to
   ``videoscore2_tiny`` in the published layout (``config.json``, ``generation_config.json``,
   ``model.safetensors``, tokenizer and processor files);
2. writes two small synthetic videos as mp4 (``vpotool.video.write_video``) and runs the checkout's
   ``vs2_inference.main`` on each, recording the frames decord decoded, the frame indices qwen-vl-utils kept, the
   query text, token ids, pixel values (first rows and row sums), the generated token ids and text, the processed
   logits of every generated step, and the three soft scores it computed (None: a random model writes no scores);
3. feeds a hand-written answer in upstream's output format through the same model (teacher forcing) and runs the
   checkout's ``find_score_token_index_by_prompt`` and ``ll_based_soft_score_normed`` on its token ids and logits,
   recording the answer ids, the logits and the three soft scores, so that the score read is checked too.

What is replaced to run it here, and why (nothing else of the inference path is touched):
- ``.to("cuda")`` of the model and the inputs becomes ``.to("cpu")`` (no GPU);
- ``generate`` runs greedy (``do_sample=False``: vpotool's deterministic default; upstream samples at temperature
  0.7) and with ``max_new_tokens=NEW_TOKENS`` instead of 1024 (the test stays short);
- ``cv2`` is an empty module: the checkout imports it for ``infer_fps="raw"`` only, which ``main`` does not use;
- the venv's ``kernels`` package (which transformers 4.53 would use if importable) is hidden: it needs a newer
  huggingface-hub than transformers 4.53 takes;
- torchvision's compiled ops do not load against a CPU-only torch; the two op schemas that torchvision registers
  fake kernels for (``nms``, ``qnms``) are declared so that it imports (no op of it runs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
SEED = 0
FOLDER = "videoscore2_tiny"
NEW_TOKENS = 200  # the taught answer takes about 110
PROMPTS = ["a red ball rolls to the left", "two cats play in the snow at night"]
ANSWER = (
    "The ball keeps its shape and the motion is smooth.\n"
    "(1) visual quality: 4;\n(2) text-to-video alignment: 3,\n(3) physical/common-sense consistency: 5"
)


def shim_torchvision() -> None:
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    shim_torchvision.lib = lib  # keep the library alive


def tiny_model(path: Path, upstream: Path) -> None:
    """A random tiny Qwen2.5-VL with a BPE tokenizer trained on the upstream query and answer texts."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2TokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    sys.path.insert(0, str(ROOT / "examples" / "videoalign"))
    from make_reference import CHAT_TEMPLATE, SPECIAL  # Qwen2-VL's; Qwen2.5-VL-Instruct's chat template is the same

    corpus = [(upstream / "vs2_inference.py").read_text(), ANSWER, *PROMPTS]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
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
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
    config = Qwen2_5_VLConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
        vision_config={
            "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
            "fullatt_block_indexes": [0], "window_size": 112, "tokens_per_second": 2,
        },
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"], repetition_penalty=1.05,
    )  # fmt: skip
    model.save_pretrained(path)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)


def recorders(decord, transformers, generation: dict) -> tuple[dict, list, list]:
    """Hooks that record what upstream's inference does: ``generate``'s inputs, model and output (run with
    ``generation`` in place of upstream's settings) in the dict, the frame indices decord reads in the first list,
    the chat texts rendered in the second."""
    record: dict = {}
    generate = transformers.GenerationMixin.generate

    def recorded(self, **kw):
        record["inputs"] = dict(kw)
        kw.update(generation)
        record["model"] = self
        record["gen"] = generate(self, **kw)
        return record["gen"]

    transformers.GenerationMixin.generate = recorded
    kept: list[list[int]] = []
    get_batch = decord.VideoReader.get_batch
    decord.VideoReader.get_batch = lambda self, idx: (kept.append(list(idx)), get_batch(self, idx))[1]
    texts: list[str] = []
    render = transformers.ProcessorMixin.apply_chat_template

    def record_text(self, *a, **kw):
        texts.append(render(self, *a, **kw))
        return texts[-1]

    transformers.ProcessorMixin.apply_chat_template = record_text
    return record, kept, texts


def synthetic_videos() -> list[tuple[np.ndarray, int]]:
    """Two small uint8 ``[T, H, W, 3]`` videos with their fps: 28 frames at 8 fps (qwen-vl-utils keeps 7 frames,
    floored to 6) and 9 frames at 4 fps (4.5, floored to 4)."""
    rng = np.random.default_rng(SEED)
    t = np.arange(28)[:, None, None]
    y, x = np.mgrid[0:24, 0:32]
    a = np.stack([(x * 7 + t * 9) % 256, (y * 9 + t * 5) % 256, (x + y + t * 11) % 256], -1).astype(np.uint8)
    b = rng.integers(0, 256, size=(9, 28, 28, 3), dtype=np.uint8)
    return [(a, 8), (b, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", required=True, help="a VideoScore2 checkout (github TIGER-AI-Lab/VideoScore2)")
    ap.add_argument("--out", default=str(ROOT / "tests" / "data"), help="where the tiny folder and reference go")
    ap.add_argument("--model", help="judge with this Qwen2.5-VL folder instead of writing a tiny random one")
    args = ap.parse_args()
    upstream = Path(args.upstream).resolve()
    out = Path(args.out).resolve()
    folder = Path(args.model).resolve() if args.model else out / FOLDER
    os.environ["FORCE_QWENVL_VIDEO_READER"] = "decord"
    shim_torchvision()
    sys.path.insert(0, str(upstream))
    sys.path.insert(0, str(ROOT))
    import decord

    sys.modules["kernels"] = None  # a newer `kernels` in the venv does not import with huggingface-hub 0.34
    import transformers

    sys.modules["cv2"] = types.ModuleType("cv2")  # after transformers, which looks for a real one
    import vs2_inference
    from safetensors.torch import save_file

    from vpotool.video import write_video

    if not args.model:
        tiny_model(folder, upstream)

    module_to, batch_to = torch.nn.Module.to, transformers.BatchFeature.to
    torch.nn.Module.to = lambda self, *a, **kw: module_to(self, *("cpu" if x == "cuda" else x for x in a), **kw)
    transformers.BatchFeature.to = lambda self, *a, **kw: batch_to(self, *("cpu" if x == "cuda" else x for x in a))

    record, kept, texts = recorders(decord, transformers, dict(do_sample=False, max_new_tokens=NEW_TOKENS))
    soft: list = []
    score = vs2_inference.ll_based_soft_score_normed
    vs2_inference.ll_based_soft_score_normed = lambda *a: (soft.append(score(*a)), soft[-1])[1]

    tensors, meta = {}, {"model": folder.name, "transformers": transformers.__version__, "prompts": PROMPTS,
                         "videos": [], "answer": ANSWER}  # fmt: skip
    for i, (video, fps) in enumerate(synthetic_videos()):
        path = out / f"videoscore2_{i}.mp4"
        write_video(path, video, fps)
        decoded = decord.VideoReader(str(path))
        tensors[f"frames_{i}"] = torch.from_numpy(decoded.get_batch(list(range(len(decoded)))).asnumpy()).contiguous()
        kept.clear()
        printed = io.StringIO()
        with torch.no_grad(), contextlib.redirect_stdout(printed):
            vs2_inference.main(str(folder), str(path), PROMPTS[i])
        os.remove(path)
        inputs, gen = record["inputs"], record["gen"]
        length = inputs["input_ids"].shape[1]
        tensors[f"input_ids_{i}"] = inputs["input_ids"][0].contiguous()
        pixels = inputs["pixel_values_videos"]
        tensors[f"pixel_values_head_{i}"] = pixels[:8].contiguous()
        tensors[f"pixel_values_sum_{i}"] = pixels.double().sum(1)
        tensors[f"generated_{i}"] = gen.sequences[0, length:].contiguous()
        tensors[f"step_logits_{i}"] = torch.cat(gen.scores).contiguous()  # processed, [new tokens, vocab]
        grid = inputs["video_grid_thw"][0].tolist()
        output = printed.getvalue().split("[Raw Model Output]\n", 1)[1].split("\n\n====== Inference Result", 1)[0]
        meta["videos"].append(
            {
                "fps": decoded.get_avg_fps(), "grid_thw": grid, "size": [grid[1] * 14, grid[2] * 14],
                "frame_indices": kept[-1], "query": texts[-1], "output_text": output[1:],
                "second_per_grid_ts": inputs["second_per_grid_ts"][0].item(), "scores": soft[-3:],
            }
        )  # fmt: skip

        if i == 0:  # the hand-written answer, teacher-forced after video 0's query
            tokenizer = vs2_inference.AutoProcessor.from_pretrained(str(folder)).tokenizer
            answer = tokenizer.encode(ANSWER, add_special_tokens=False)
            ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], 1)
            forward = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            with torch.no_grad():
                logits = record["model"](input_ids=ids, attention_mask=torch.ones_like(ids), **forward).logits
            steps = [row[None] for row in logits[0, length - 1 : -1]]
            hard = (4, 3, 5)
            labels = ("visual quality:", "text-to-video alignment:", "physical/common-sense consistency:")
            index = [vs2_inference.find_score_token_index_by_prompt(t, tokenizer, answer) for t in labels]
            tensors["answer_ids"] = torch.tensor(answer)
            tensors["answer_logits"] = torch.cat(steps).contiguous()
            meta["answer_index"] = index
            meta["answer_scores"] = [score(h, j, steps, tokenizer) for h, j in zip(hard, index, strict=True)]
    save_file(tensors, str(out / "videoscore2_reference.safetensors"))
    (out / "videoscore2_reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    print({k: v for k, v in meta.items() if k.startswith("answer_")}, [v["scores"] for v in meta["videos"]])


if __name__ == "__main__":
    main()
