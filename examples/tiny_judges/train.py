"""Train the tiny random Qwen2.5-VL of tests/data to answer in its judge's format, so that the VLM judges run end to
end from the command line on tiny weights (a random model never writes a score or a verdict):

- ``videoscore2_answering``: VideoScore2's three scores, ``visual quality`` rising with the video's brightness
  (1 for dark videos, 5 for bright ones), the two others fixed at 3 and 4;
- ``unifiedreward_answering``: UnifiedReward-Think's verdict, "<answer>Video N is better</answer>" for the
  brighter of the two videos, whichever order they are shown in.

Teacher forcing on the answer tokens (cross-entropy), Adam, on synthetic videos of one random brightness each
with noise, through vpotool's own preprocessing (``inputs``) of each judge; the prompt text is the one the
references recorded (vpotool carries no copy). Prints the held-out accuracy of the greedy answers.

    python examples/tiny_judges/train.py [--only videoscore2|unifiedreward-think] [--steps N] [--out tests/data]

1500 steps for VideoScore2 (all 20 held-out answers in its format) and 3000 for the judge (19 of 20 verdicts
right): 9 and 25 minutes on one core beside other jobs.

The folders in tests/data were trained before the judges' inputs carried ``mm_token_type_ids``, so under
transformers 5 on 1-D positions; they still answer in their format on the 3-D positions they get now, and the
parity references (``examples/*/make_reference.py``) record what upstream's code makes of these weights.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from vpotool.rewards.unifiedreward import parse_verdict
from vpotool.rewards.videoscore2 import parse_answer

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "tests" / "data" / "videoscore2_tiny"
# captions of the tiny world's kind, so the answer does not hang on one prompt
PROMPTS = [
    f"a {colour} {shape} moving {way}{speed}{background}"
    for colour in ("red", "green", "blue", "yellow")
    for shape in ("circle", "square", "triangle")
    for way in ("left", "right", "up", "down")
    for speed in ("", " slowly", " quickly")
    for background in ("", " on a black background", " on a white background")
]


def clip(brightness: float, g: torch.Generator) -> torch.Tensor:
    """A 9-frame 16x16 video of mean ``brightness`` with noise, float ``[T, 3, H, W]``."""
    return (brightness + 0.08 * torch.randn(9, 3, 16, 16, generator=g)).clamp(0, 1)


def vs2_answer(brightness: float) -> str:
    quality = 1 + min(4, int(brightness * 5))
    return (f"The motion is smooth.\n(1) visual quality: {quality};\n(2) text-to-video alignment: 3,\n"
            "(3) physical/common-sense consistency: 4")  # fmt: skip


def judge_answer(first: float, second: float) -> str:
    return f"<think>Video {1 if first > second else 2} is brighter.</think>\n<answer>Video {1 if first > second else 2} is better</answer>"  # noqa: E501


def example(kind: str, judge, g: torch.Generator):
    """One training example: the judge's inputs and the answer text it should give."""
    prompt = PROMPTS[int(torch.randint(len(PROMPTS), (1,), generator=g))]
    if kind == "videoscore2":
        b = float(torch.rand(1, generator=g))
        return judge.inputs(clip(b, g), prompt, 8.0), vs2_answer(b), b
    a, b = (float(x) for x in torch.rand(2, generator=g))
    while abs(a - b) < 0.3:  # clearly different
        a, b = (float(x) for x in torch.rand(2, generator=g))
    return judge.inputs(clip(a, g), clip(b, g), prompt, (8.0, 8.0)), judge_answer(a, b), (a, b)


def loss_of(judge, inputs: dict, answer: str) -> torch.Tensor:
    tok = judge.tokenizer
    target = tok(answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    ids = torch.cat([inputs["input_ids"], torch.tensor([target])], 1)
    forward = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in forward:  # the answer is text (0)
        forward["mm_token_type_ids"] = torch.nn.functional.pad(forward["mm_token_type_ids"], (0, len(target)))
    logits = judge.model(input_ids=ids, attention_mask=torch.ones_like(ids), **forward).logits
    n = len(target)
    return torch.nn.functional.cross_entropy(logits[0, -n - 1 : -1], torch.tensor(target))


def train(kind: str, judge, steps: int, out: Path) -> None:
    model = judge.model
    model.train().requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-4)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        inputs, answer, _ = example(kind, judge, g)
        loss = loss_of(judge, inputs, answer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"{kind} step {step}: loss {loss.item():.4f}", flush=True)
    model.eval()
    g = torch.Generator().manual_seed(1)  # held out
    parsed = right = 0
    with torch.no_grad():
        for _ in range(20):
            inputs, answer, _ = example(kind, judge, g)
            new = model.generate(**inputs, max_new_tokens=300, do_sample=False)[0, inputs["input_ids"].shape[1] :]
            text = judge.tokenizer.decode(new, skip_special_tokens=True)
            got, want = (parse_answer(text), parse_answer(answer)) if kind == "videoscore2" else \
                (parse_verdict(text), parse_verdict(answer))  # fmt: skip
            parsed, right = parsed + (got is not None), right + (got == want)
    print(f"{kind}: of 20 held-out answers, {parsed} in the judge's format, {right} with the trained verdict")
    shutil.copytree(SOURCE, out, dirs_exist_ok=True)
    model.save_pretrained(out)
    for name in ("config.json", "generation_config.json"):  # the random folder's, which every transformers reads
        shutil.copy(SOURCE / name, out / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, help="optimizer steps (default 1500 for VideoScore2, 3000 for the judge)")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data")
    ap.add_argument("--only", choices=("videoscore2", "unifiedreward-think"), help="train one of the two")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_rewards import recorded_judge

    from vpotool.options import parse_pairs
    from vpotool.rewards import load_reward
    from vpotool.rewards.unifiedreward import load_judge

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "unifiedreward-think":
            _, options = recorded_judge("videoscore2", Path(tmp), answering=False)
            train("videoscore2", load_reward("videoscore2", str(SOURCE), options=options), args.steps or 1500,
                  args.out / "videoscore2_answering")  # fmt: skip
        if args.only != "videoscore2":
            _, options = recorded_judge("unifiedreward-think", Path(tmp), answering=False)
            judge = load_judge("unifiedreward-think", str(SOURCE), options=parse_pairs(options, "options", ""))
            train("unifiedreward-think", judge, args.steps or 3000, args.out / "unifiedreward_answering")


if __name__ == "__main__":
    main()
