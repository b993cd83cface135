"""Reference outputs of UnifiedReward-Think's own video-generation judging script on a tiny Qwen2.5-VL taught to
judge in its format, for ``tests/test_judge.py`` (which then needs no UnifiedReward checkout).

    pip install --no-deps --target /tmp/vs2deps transformers==4.53.2 tokenizers==0.21.4 huggingface-hub==0.34.4 \
        qwen-vl-utils==0.0.14 decord==0.6.0 torchvision==0.28.0 safetensors av
    PYTHONPATH=/tmp/vs2deps python examples/unifiedreward/make_reference.py --upstream /path/to/UnifiedReward

transformers 4.53.2 is a version with Qwen2.5-VL as the script was written for; qwen-vl-utils is unpinned upstream
(0.0.14 is the newest). The judge is ``tests/data/unifiedreward_answering`` (``--model``): the tiny random
Qwen2.5-VL of ``examples/videoscore2/make_reference.py`` (same architecture as UnifiedReward-Think-qwen-7b), taught
by ``examples/tiny_judges/train.py`` to name the brighter video, so that its answer and logits move with the
videos' positions (a random model's barely do). The script writes two small synthetic videos as mp4 (the second
darkened, so the judge has a winner) and runs the checkout's
``UnifiedReward-Think/inference_qwen/video_generation/qwen_infer_cot_video_generation.py`` on them, in both orders,
recording the frames decord decoded, the frame indices qwen-vl-utils kept of each video, the query text, token
ids, pixel values (first rows and row sums), video grids, ``second_per_grid_ts``, the generated ids, the processed
logits of every generated step and the text it printed.

What is replaced to run it here, and why (nothing else of the judging path is touched): the script is module-level
code, so its four settings are rewritten before it runs: ``model_path`` (the tiny folder), ``prompt`` and the two
video paths (the synthetic videos), and ``device_map`` ``cuda:0`` becomes ``cpu`` (no GPU); ``generate`` is run
with ``max_new_tokens=NEW_TOKENS`` instead of 1024 (the test stays short) and asked for its step logits. The tiny
model's generation config does not sample, so generation is greedy as vpotool's default. The shims of
``examples/videoscore2/make_reference.py`` (torchvision's op schemas, ``cv2``, ``kernels``) are reused.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "UnifiedReward-Think/inference_qwen/video_generation/qwen_infer_cot_video_generation.py"
FOLDER = "unifiedreward_answering"
NEW_TOKENS = 120  # the taught answer takes about 70
DARKER = 0.35  # the second video's brightness factor
PROMPT = "a red ball rolls to the left"


def settings(source: str, values: dict[str, str]) -> str:
    """``source`` with each ``name = ...`` line's value replaced (each must occur once)."""
    for name, value in values.items():
        source, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", source, flags=re.MULTILINE)
        assert n == 1, name
    source, n = re.subn(r"'cuda:0'", "'cpu'", source)
    assert n == 1
    return source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", required=True, help="a UnifiedReward checkout (github CodeGoat24/UnifiedReward)")
    ap.add_argument("--out", default=str(ROOT / "tests" / "data"), help="where the reference goes")
    ap.add_argument("--model", default=str(ROOT / "tests" / "data" / FOLDER), help="the Qwen2.5-VL judge folder")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    model = Path(args.model).resolve()
    os.environ["FORCE_QWENVL_VIDEO_READER"] = "decord"
    sys.path.insert(0, str(ROOT / "examples" / "videoscore2"))
    sys.path.insert(0, str(ROOT))
    from make_reference import recorders, shim_torchvision, synthetic_videos

    shim_torchvision()
    import decord

    sys.modules["kernels"] = None  # a newer `kernels` in the venv does not import with huggingface-hub 0.34
    import transformers

    sys.modules["cv2"] = types.ModuleType("cv2")
    from safetensors.torch import save_file

    from vpotool.video import write_video

    source = (Path(args.upstream) / SCRIPT).read_text()
    record, kept, texts = recorders(decord, transformers, dict(max_new_tokens=NEW_TOKENS))
    recorded = transformers.GenerationMixin.generate
    transformers.GenerationMixin.generate = lambda self, **kw: (
        recorded(self, **kw, output_scores=True, return_dict_in_generate=True).sequences
    )  # the script reads ids; the step logits stay in the record

    tensors, meta = {}, {"model": model.name, "transformers": transformers.__version__, "prompt": PROMPT, "runs": []}
    paths = []
    for i, (video, fps) in enumerate(synthetic_videos()):
        video = video if i == 0 else (video * DARKER).astype(video.dtype)
        paths.append(out / f"unifiedreward_{i}.mp4")
        write_video(paths[-1], video, fps)
        decoded = decord.VideoReader(str(paths[-1]))
        tensors[f"frames_{i}"] = torch.from_numpy(decoded.get_batch(list(range(len(decoded)))).asnumpy()).contiguous()
        meta[f"fps_{i}"] = decoded.get_avg_fps()
    for r, order in enumerate([(0, 1), (1, 0)]):
        kept.clear()
        values = {"model_path": str(model), "prompt": PROMPT, "video_path_1": str(paths[order[0]]),
                  "video_path_2": str(paths[order[1]])}  # fmt: skip
        printed = io.StringIO()
        with torch.no_grad(), contextlib.redirect_stdout(printed):
            exec(compile(settings(source, values), SCRIPT, "exec"), {"__name__": "__main__"})
        inputs, gen = record["inputs"], record["gen"]
        length = inputs["input_ids"].shape[1]
        tensors[f"input_ids_{r}"] = inputs["input_ids"][0].contiguous()
        pixels = inputs["pixel_values_videos"]
        tensors[f"pixel_values_head_{r}"] = pixels[:8].contiguous()
        tensors[f"pixel_values_sum_{r}"] = pixels.double().sum(1)
        tensors[f"generated_{r}"] = gen.sequences[0, length:].contiguous()
        tensors[f"step_logits_{r}"] = torch.cat(gen.scores).contiguous()  # processed, [new tokens, vocab]
        meta["runs"].append(
            {
                "order": list(order), "grid_thw": inputs["video_grid_thw"].tolist(), "frame_indices": list(kept),
                "second_per_grid_ts": inputs["second_per_grid_ts"].tolist(), "query": texts[-1],
                "output_text": printed.getvalue()[:-1],
            }
        )  # fmt: skip
    for path in paths:
        os.remove(path)
    save_file(tensors, str(out / "unifiedreward_reference.safetensors"))
    (out / "unifiedreward_reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    print([(run["grid_thw"], run["output_text"][:60]) for run in meta["runs"]])


if __name__ == "__main__":
    main()
