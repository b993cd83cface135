"""Typed stage configs: defaults < ``--config FILE.yaml`` < flags. Unknown keys are errors; the resolved config
is written next to a stage's outputs. This module imports no torch, so ``vpotool --help`` stays instant."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpotool.errors import VpoError, disk_space, not_a_file


def opt(default: Any, help: str) -> Any:
    """A config field with a default and the one-line help the CLI shows for its flag."""
    return field(default=default, metadata={"help": help})


def doc(cls, name: str) -> str:
    """The help text of a config field (the CLI's option help)."""
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) -> ``(i, n)``."""
    try:
        i, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise VpoError(f"--shard takes i/n, e.g. 0/4 (got {spec!r})") from None
    if n < 1 or not 0 <= i < n:
        raise VpoError(f"--shard {spec}: need 0 <= i < n (shards are numbered from 0, e.g. 0/4 ... 3/4)")
    return i, n


class StageConfig:
    """Shared behaviour of the stage configs (each is a dataclass)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def _check(self, ok: bool, name: str, why: str) -> None:
        if not ok:
            raise VpoError(f"{flag(name)} {why} (got {getattr(self, name)!r})")


REWARD_PATH_HELP = (
    "Weights for model-based rewards: a local folder, file or hub id, or name=path pairs (videoscore=DIR,clip=DIR)."
)
REWARD_OPTIONS_HELP = (
    "Options for model-based rewards as reward.option=value pairs (e.g. videoscore.frames=16,clip.frames=8)."
)
SAMPLER_HELP = (
    "Deterministic sampler: pipeline steps with the checkpoint's own scheduler, as its diffusers pipeline does (Wan: "
    "UniPC multistep); euler: vpotool's first-order flow/DDIM grid, which the trainers' rollouts use. Other "
    "families' pipelines step vpotool's grid already; --noise-level > 0 always takes vpotool's SDE steps."
)
NEGATIVE_HELP = (
    "Text for the unconditional branch of guidance, encoded like a prompt, as the diffusers pipelines' "
    "negative_prompt (default: the family's own unconditional input: the empty prompt, Open-Sora's null caption)."
)
MODEL_OPTIONS_HELP = (
    "Options of the model family as option=value pairs: vae_tiling=true, vae_slicing=true (decode in tiles or one "
    "video at a time: less memory; tiny, wan, cogvideox, ltx); opensora: aesthetic_score=6.5 (the suffix upstream "
    "appends to each prompt; none: no suffix), clean_prompts=true (upstream's T5 caption cleaning; false: lower-case)."
)
MODEL_HELP = "Model backend name (tiny, wan, cogvideox, ltx, ...)."
MODEL_PATH_HELP = "Weights: a local folder or hub id (tiny: its built-in weights if unset)."
FRAMES_HELP = "Frames per video (default: the model's)."
HEIGHT_HELP = "Height in pixels (default: the model's)."
WIDTH_HELP = "Width in pixels (default: the model's)."
SIZE_HELP = "A size preset of the model, e.g. 240p or 480p:16:9 for opensora (--height and --width override it)."
CONTEXT_PARALLEL_HELP = (
    "N processes of a torchrun / accelerate launch share each video's tokens (Ulysses sequence parallelism, "
    "diffusers' engine; tiny, wan, ltx); the launch's WORLD_SIZE / N groups split the data."
)


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # a reward's or judge's --dtype


@dataclass
class SampleConfig(StageConfig):
    prompts: str = opt("", "Prompts: a .txt file (one per line) or a prompts .parquet.")
    out: str = opt("", "Run folder for samples.parquet, videos/ and latents/.")
    model: str = opt("tiny", MODEL_HELP)
    model_path: str | None = opt(None, MODEL_PATH_HELP)
    model_options: str = opt("", MODEL_OPTIONS_HELP)
    adapter: str | None = opt(None, "A LoRA checkpoint folder (checkpoints/step-N) to sample with.")
    candidates: int = opt(4, "Videos per prompt (K).")
    frames: int | None = opt(None, FRAMES_HELP)
    height: int | None = opt(None, HEIGHT_HELP)
    width: int | None = opt(None, WIDTH_HELP)
    size: str | None = opt(None, SIZE_HELP)
    fps: int | None = opt(None, "Frames per second of the written mp4 (default: the model's).")
    steps: int | None = opt(None, "Denoising steps (default: the model's).")
    guidance: float | None = opt(None, "Classifier-free guidance scale (default: the model's; 1 disables).")
    noise_level: float = opt(0.0, "0: deterministic ODE/DDIM sampling; > 0: stochastic SDE steps of this level.")
    sampler: str = opt("pipeline", SAMPLER_HELP)
    negative_prompt: str = opt("", NEGATIVE_HELP)
    save_trajectory: bool = opt(False, "Also store each video's sampler states and step log-probabilities in its "
                                "latent file, for offline train-scst (needs --noise-level > 0).")  # fmt: skip
    seed: int = opt(0, "Base seed; each video's seed derives from it, its prompt id and candidate index.")
    batch_size: int = opt(8, "Videos per denoiser call (a prompt's K candidates always go together).")
    device: str = opt("auto", "cpu, cuda, cuda:1, ... or auto.")
    dtype: str = opt("float32", "Model dtype: float32, bfloat16 or float16.")
    context_parallel: int = opt(1, CONTEXT_PARALLEL_HELP)
    shard: str = opt("0/1", "i/n: sample only the i-th of n slices of the prompts (SLURM arrays).")
    crf: int = opt(12, "H.264 quality of the written mp4 (lower is closer to the pixels).")

    def __post_init__(self):
        self._check(bool(self.prompts), "prompts", "is required")
        self._check(bool(self.out), "out", "is required")
        self._check(self.candidates >= 1, "candidates", "must be at least 1")
        self._check(self.context_parallel >= 1, "context_parallel", "must be at least 1")
        for name in ("frames", "height", "width", "fps", "steps"):
            self._check(getattr(self, name) is None or getattr(self, name) >= 1, name, "must be positive")
        self._check(self.noise_level >= 0, "noise_level", "must be >= 0")
        self._check(self.sampler in ("pipeline", "euler"), "sampler", "must be pipeline or euler")
        self._check(
            self.noise_level > 0 or not self.save_trajectory,
            "noise_level",
            "must be > 0 with --save-trajectory (deterministic steps have no log-probabilities); pass e.g. "
            "--noise-level 0.7",
        )
        self._check(self.batch_size >= 1, "batch_size", "must be at least 1")
        self._check(0 <= self.crf <= 51, "crf", "must be in 0..51")
        parse_shard(self.shard)


@dataclass
class ScoreConfig(StageConfig):
    samples: str = opt("", "samples.parquet written by `vpotool sample`.")
    out: str = opt("", "Output scores.parquet.")
    reward: str = opt(
        "temporal",
        "Reward name(s), comma-separated, each scored separately (e.g. flicker,temporal), "
        "or one weighted composite (e.g. videoscore:1,clip:0.5).",
    )
    reward_path: str | None = opt(None, REWARD_PATH_HELP)
    reward_options: str = opt("", REWARD_OPTIONS_HELP)
    batch_size: int = opt(8, "Videos per reward call.")
    device: str = opt("auto", "cpu, cuda, cuda:1, ... or auto.")
    dtype: str = opt("auto", "Reward model dtype: float32, bfloat16, float16 or auto (float32 on a CPU; on a GPU "
                     "the dtype upstream runs each reward in: bfloat16 for videoalign, else float32).")  # fmt: skip
    shard: str = opt("0/1", "i/n: score only the i-th of n slices of the samples.")

    def __post_init__(self):
        self._check(bool(self.samples), "samples", "is required")
        self._check(bool(self.out), "out", "is required")
        self._check(self.batch_size >= 1, "batch_size", "must be at least 1")
        self._check(self.dtype in DTYPE_CHOICES, "dtype", "must be auto, float32, bfloat16 or float16")
        parse_shard(self.shard)


@dataclass
class PairConfig(StageConfig):
    samples: str = opt("", "samples.parquet written by `vpotool sample`.")
    scores: str = opt("", "scores.parquet written by `vpotool score` (optional with --labels).")
    labels: str = opt("", "labels.parquet written by `vpotool label`: adds human pairs (source human), one per "
                      "two videos with more votes for one; with --scores the output mixes both.")  # fmt: skip
    out: str = opt("", "Output pairs.parquet.")
    reward: str | None = opt(None, "Which reward's scores to rank by (default: the only one in --scores).")
    dimension: str = opt("overall", "Which score dimension to rank by.")
    strategy: str = opt("best-worst", "best-worst: one pair per prompt; all: every ordered pair above the margin "
                        "(--scores only).")  # fmt: skip
    min_margin: float = opt(0.0, "Skip reward pairs whose score difference is below this (human pairs: see --labels).")

    def __post_init__(self):
        self._check(bool(self.samples), "samples", "is required")
        self._check(bool(self.scores or self.labels), "scores", "is required (or --labels, or both)")
        self._check(bool(self.out), "out", "is required")
        self._check(self.strategy in ("best-worst", "all"), "strategy", "must be best-worst or all")
        self._check(self.min_margin >= 0, "min_margin", "must be >= 0")


@dataclass
class LabelConfig(StageConfig):
    samples: str = opt("", "samples.parquet written by `vpotool sample`: the videos to compare.")
    pairs: str = opt("", "A pairs.parquet whose pairs to label, in its order (default: every two candidates of "
                     "each prompt in --samples).")  # fmt: skip
    out: str = opt("", "labels.parquet to write, one row per answer, saved at once (rerun to resume).")
    labeler: str = opt("", "Your name, stored with each answer (default: your login name). Several people: one "
                       "--out each, then `vpotool merge` them.")  # fmt: skip
    host: str = opt("127.0.0.1", "Address to serve on; other than 127.0.0.1/localhost, anyone who can reach it "
                    "can label.")  # fmt: skip
    port: int = opt(0, "Port to serve on (0: any free port).")
    judge: str = opt("", "A pairwise video judge that labels instead of a person (no page is served): "
                     "unifiedreward-think. Each pair is judged in both orders; see docs/rewards.md.")  # fmt: skip
    judge_path: str | None = opt(None, "The judge's checkpoint: a local folder or hub id.")
    judge_options: str = opt("", "Judge options as option=value, comma-separated (e.g. max_new_tokens=512,"
                             "prompt_template=PATH).")  # fmt: skip
    device: str = opt("auto", "Device for --judge: cpu, cuda, cuda:1, ... or auto.")
    dtype: str = opt("auto", "--judge dtype: float32, bfloat16, float16 or auto (float32 on a CPU, bfloat16 on a "
                     "GPU as upstream runs unifiedreward-think).")  # fmt: skip

    def __post_init__(self):
        self._check(bool(self.samples), "samples", "is required")
        self._check(bool(self.out), "out", "is required")
        self._check(bool(self.host), "host", "is required (127.0.0.1 serves only this machine)")
        self._check(0 <= self.port <= 65535, "port", "must be in 0..65535 (0: any free port)")
        self._check(self.dtype in DTYPE_CHOICES, "dtype", "must be auto, float32, bfloat16 or float16")
        self._check(bool(self.judge) or not self.judge_path, "judge_path", "needs --judge (the judge's name)")
        if self.judge and not self.labeler.strip():
            self.labeler = self.judge
        if not self.labeler.strip():
            import getpass

            try:
                self.labeler = getpass.getuser()
            except (OSError, KeyError):  # no login name (some containers)
                self.labeler = "anonymous"
        self.labeler = self.labeler.strip()


def sub_config(cls, cfg, **overrides):
    """A ``cls`` config with every field ``cfg`` shares with it, then ``overrides`` (loop -> stage configs)."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)}
    return cls(**{**shared, **overrides})


def load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    why = not_a_file(p)
    if why == "not found":
        raise VpoError(f"config file not found: {path} (pass --config with a YAML file)")
    if why:
        raise VpoError(f"config file {path} {why} (pass --config with a YAML file)")
    try:
        text = p.read_text()
        # Options are plain values. Nested aliases (a "billion laughs" file) expand to gigabytes once printed or
        # copied, from a few hundred bytes: refused before anything is built from them.
        alias = next((e for e in yaml.parse(text, Loader=yaml.SafeLoader) if isinstance(e, yaml.AliasEvent)), None)
        if alias is not None:
            raise VpoError(
                f"{path} uses the YAML alias *{alias.anchor} (line {alias.start_mark.line + 1}); config files take "
                "plain values: write the value out instead"
            )
        data = yaml.safe_load(text) or {}
    except UnicodeDecodeError as e:
        raise VpoError(f"{path} is not UTF-8 text; pass --config with a YAML file") from e
    except yaml.YAMLError as e:
        raise VpoError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise VpoError(f"{path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(cls, config_file: str | None = None, **flags):
    """Resolve a stage config: dataclass defaults, then the YAML file, then flags that were given (not None)."""
    data = load_yaml(config_file) if config_file else {}
    data.update({k: v for k, v in flags.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = config_file or "flags"
        raise VpoError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    return cls(**{k: _typed(k, v, types[k]) for k, v in data.items()})


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _typed(name: str, value: Any, annotation: str) -> Any:
    """Check a value against its field annotation (``"int"``, ``"float | None"``, ...); ints pass as floats."""
    parts = [p.strip() for p in str(annotation).split("|")]
    if value is None and "None" in parts:
        return None
    for p in parts:
        t = _TYPES.get(p)
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if t is not None and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return _in_range(name, value)
    wanted = " or ".join(p for p in parts if p != "None")
    raise VpoError(f"{flag(name)} must be {wanted} (got {value!r})")


SEED_LIMIT = 2**63  # seeds feed torch generators and the sample ids' arithmetic: non-negative 64-bit


def _in_range(name: str, value: Any) -> Any:
    """Refuse a NaN or infinite number (guidance nan made every latent NaN and black videos, exit 0) and a seed
    outside ``[0, 2**63)``, naming the flag."""
    if isinstance(value, float) and not math.isfinite(value):
        raise VpoError(f"{flag(name)} must be a finite number (got {value!r})")
    if name == "seed" and not 0 <= value < SEED_LIMIT:
        raise VpoError(f"{flag(name)} must be in 0..2**63 - 1 (got {value!r})")
    return value


def save_config(cfg: StageConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically) next to the stage's outputs."""
    import os

    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with disk_space(path):
            tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class EvalConfig(StageConfig):
    out: str = opt("", "Eval folder: eval.parquet, prompts.parquet and one sample/score run per checkpoint.")
    model: str = opt("tiny", MODEL_HELP)
    model_path: str | None = opt(None, MODEL_PATH_HELP)
    model_options: str = opt("", MODEL_OPTIONS_HELP)
    adapters: str = opt("", "LoRA checkpoint folders to compare with the base model, comma-separated (flag "
                        "--adapter, repeatable).")  # fmt: skip
    prompts: str = opt("world:heldout", "Held-out prompts: a .txt, a prompts .parquet or a world split (world:val).")
    seeds: int = opt(1, "Videos per prompt, each from its own fixed seed (the same for every checkpoint).")
    reward: str = opt("world,flicker,smoothness,dynamics", "Reward name(s) to score with, comma-separated.")
    reward_path: str | None = opt(None, REWARD_PATH_HELP)
    reward_options: str = opt("", REWARD_OPTIONS_HELP)
    frames: int | None = opt(None, FRAMES_HELP)
    height: int | None = opt(None, HEIGHT_HELP)
    width: int | None = opt(None, WIDTH_HELP)
    size: str | None = opt(None, SIZE_HELP)
    steps: int | None = opt(None, "Denoising steps (default: the model's).")
    guidance: float | None = opt(None, "Classifier-free guidance scale (default: the model's; 1 disables).")
    sampler: str = opt("pipeline", SAMPLER_HELP)
    negative_prompt: str = opt("", NEGATIVE_HELP)
    seed: int = opt(0, "Base seed; each video's seed derives from it, its prompt id and its seed index.")
    batch_size: int = opt(8, "Videos per denoiser and reward call.")
    device: str = opt("auto", "cpu, cuda, cuda:1, ... or auto.")
    dtype: str = opt("float32", "Model dtype: float32, bfloat16 or float16.")
    baseline: str = opt("base", "Checkpoint that win rates are computed against: base, or one --adapter (its path "
                        "or its name in the table).")  # fmt: skip
    frechet: bool = opt(True, "Also report world.frechet, the distance to ground-truth clips (world prompts only).")
    fvd_reference: str | None = opt(None, "Also report fvd: the Frechet distance of each checkpoint's videos to this "
                                    "folder of reference clips (unpaired to the prompts).")  # fmt: skip
    fvd_model: str | None = opt(None, "The FVD's features: a VideoMAE classifier folder, as content-debiased FVD "
                                "(default: the tiny world's clip features).")  # fmt: skip

    def __post_init__(self):
        self._check(bool(self.out), "out", "is required")
        self._check(bool(self.prompts), "prompts", "is required")
        self._check(self.seeds >= 1, "seeds", "must be at least 1")
        self._check(self.sampler in ("pipeline", "euler"), "sampler", "must be pipeline or euler")
        self._check(bool(self.reward.strip(", ")), "reward", "needs at least one reward name")
        for name in ("frames", "height", "width", "steps"):
            self._check(getattr(self, name) is None or getattr(self, name) >= 1, name, "must be positive")
        self._check(self.batch_size >= 1, "batch_size", "must be at least 1")
        self._check(bool(self.baseline), "baseline", "must be base or one of the --adapter checkpoints")
        why = "needs --fvd-reference (the clips to compare with)"
        self._check(bool(self.fvd_reference) or not self.fvd_model, "fvd_model", why)
        twice = [a for i, a in enumerate(self.adapter_list) if a in self.adapter_list[:i]]
        if twice:
            raise VpoError(f"--adapter {twice[0]} is given twice; list each checkpoint once")

    @property
    def adapter_list(self) -> list[str]:
        """The ``--adapter`` checkpoints in order, without blanks."""
        return [a.strip() for a in self.adapters.split(",") if a.strip()]


@dataclass
class ReportConfig(StageConfig):
    """``vpotool report``: a static HTML page of a run folder or of one manifest."""

    path: str = opt("", "A run folder (from `vpotool loop` or a trainer), a pairs.parquet, or a samples.parquet.")
    out: str = opt("", "Folder for index.html (default: report/ in the run folder, or beside the manifest).")
    scores: str = opt("", "scores.parquet to join with a pairs or samples manifest (default: the one beside it).")
    page_size: int = opt(24, "Gallery cards per page.")

    def __post_init__(self):
        self._check(bool(self.path), "path", "is required: a run folder or a pairs/samples manifest")
        self._check(self.page_size >= 1, "page_size", "must be at least 1")
