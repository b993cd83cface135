"""The trainers' configs (``train-dpo``, ``train-refl``, ``train-scst``) and ``loop``'s: the options they share
(:class:`TrainConfig`) and each method's, declared once in mixins that the trainer and the loop both take."""

from __future__ import annotations

from dataclasses import dataclass

from vpotool.config import (
    CONTEXT_PARALLEL_HELP,
    FRAMES_HELP,
    HEIGHT_HELP,
    MODEL_HELP,
    MODEL_OPTIONS_HELP,
    MODEL_PATH_HELP,
    REWARD_OPTIONS_HELP,
    REWARD_PATH_HELP,
    SIZE_HELP,
    WIDTH_HELP,
    StageConfig,
    opt,
)


@dataclass
class TrainConfig(StageConfig):
    """Options every trainer shares (the common flag names across train-dpo, train-refl and train-scst)."""

    out: str = opt("", "Run folder for checkpoints/, metrics.parquet and the resolved config.")
    model: str = opt("tiny", MODEL_HELP)
    model_path: str | None = opt(None, MODEL_PATH_HELP)
    model_options: str = opt("", MODEL_OPTIONS_HELP)
    max_steps: int = opt(100, "Optimizer steps to train for.")
    lr: float = opt(1e-4, "Peak learning rate (AdamW).")
    warmup_steps: int = opt(0, "Linear warm-up steps before the constant learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).")
    batch_size: int = opt(4, "Examples per micro-batch and process.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    lora_rank: int = opt(16, "LoRA rank.")
    lora_alpha: float | None = opt(None, "LoRA alpha (default: the rank, i.e. scale 1).")
    lora_targets: str | None = opt(None, "Comma-separated module names to adapt (default: the model's attention).")
    init_adapter: str | None = opt(
        None,
        "Start the adapter from this checkpoint (a checkpoints/step-N folder of "
        "another run, e.g. SCST then DPO); its LoRA rank and alpha must be this run's.",
    )
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.")
    offload_text_encoder: bool = opt(False, "Encode the run's prompts once, then keep the text encoder and the "
                                     "embeddings in CPU memory (each prompt is encoded once either way).")  # fmt: skip
    mixed_precision: str = opt("no", "no, bf16 or fp16 (accelerate autocast).")
    resume: bool = opt(True, "Continue from the latest checkpoint in --out when there is one, as every stage "
                       "resumes when rerun (--no-resume: refuse a folder that holds checkpoints).")  # fmt: skip
    seed: int = opt(0, "Seed for data order, noise and timesteps.")
    device: str = opt("auto", "cpu, cuda or auto (under accelerate launch, accelerate decides).")
    dtype: str = opt("float32", "Frozen weights: float32, bfloat16 or float16 (adapters always train in float32).")
    context_parallel: int = opt(1, CONTEXT_PARALLEL_HELP)
    report_to: str | None = opt(None, "Also log to tensorboard or wandb (accelerate trackers).")

    def __post_init__(self):
        self._check(bool(self.out), "out", "is required")
        for name in ("max_steps", "batch_size", "grad_accum", "lora_rank", "context_parallel"):
            self._check(getattr(self, name) >= 1, name, "must be at least 1")
        self._check(self.lr > 0, "lr", "must be positive")
        self._check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self._check(self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision", "must be no, bf16 or fp16")


@dataclass
class CheckpointOptions:
    """When the trainers write checkpoints (``loop`` writes one at the end of every iteration instead)."""

    save_every: int = opt(0, "Write checkpoints/step-N every N steps (0: only at the end).")

    def check_checkpoints(self) -> None:
        self._check(self.save_every >= 0, "save_every", "must be >= 0")


@dataclass
class DpoOptions:
    """The Diffusion-DPO options of ``train-dpo`` and ``loop --algo dpo`` (one declaration, one default each)."""

    beta: float | None = opt(None, "DPO temperature on the denoising-error difference (default: 500 for flow "
                             "models, 5000 for epsilon/v ones; see docs/training.md).")  # fmt: skip
    loss_type: str = opt("sigmoid", "sigmoid (Diffusion-DPO), hinge or ipo.")
    ipo_tau: float = opt(500.0, "IPO regularisation: the loss pulls the error margin to 1 / (2 tau).")
    ref_update_interval: int = opt(0, "Copy the policy into the reference every N optimizer steps (0: never).")
    ref_adapter: str | None = opt(None, "A checkpoint to use as the reference (default: the base model).")

    def check_dpo(self) -> None:
        self._check(self.beta is None or self.beta > 0, "beta", "must be positive")
        self._check(self.loss_type in ("sigmoid", "hinge", "ipo"), "loss_type", "must be sigmoid, hinge or ipo")
        self._check(self.ref_update_interval >= 0, "ref_update_interval", "must be >= 0")


@dataclass
class DpoConfig(DpoOptions, CheckpointOptions, TrainConfig):
    pairs: str = opt("", "pairs.parquet written by `vpotool pair` (or human labels).")

    def __post_init__(self):
        super().__post_init__()
        self._check(bool(self.pairs), "pairs", "is required")
        self.check_checkpoints()
        self.check_dpo()


@dataclass
class RolloutOptions:
    """Sampling options of trainers that generate their own videos (train-refl, train-scst)."""

    prompts: str = opt("", "Training prompts: a .txt file (one per line) or a prompts .parquet.")
    reward: str = opt("temporal", "Reward name (must be differentiable for train-refl).")
    reward_path: str | None = opt(None, REWARD_PATH_HELP)
    reward_options: str = opt("", REWARD_OPTIONS_HELP)
    reward_dimension: str = opt("overall", "Which reward dimension to optimise.")
    frames: int | None = opt(None, FRAMES_HELP)
    height: int | None = opt(None, HEIGHT_HELP)
    width: int | None = opt(None, WIDTH_HELP)
    size: str | None = opt(None, SIZE_HELP)
    steps: int | None = opt(None, "Denoising steps of each rollout (default: the model's).")
    guidance: float | None = opt(None, "Classifier-free guidance scale (default: the model's).")
    reward_device: str | None = opt(None, "Device of the reward model, e.g. cuda:1 (default: the policy's).")


@dataclass
class ReflOptions:
    """The reward-gradient options of ``train-refl`` and ``loop --algo refl``."""

    backprop_steps: int = opt(1, "K: keep gradients through this many denoising steps (VADER/DRaFT-K).")
    backprop_mode: str = opt("last", "last: the last K steps; random: stop at a random late step and decode the "
                             "model's x0 prediction there (ReFL).")  # fmt: skip
    reward_frames: str = opt("all", "Frames the reward sees: all, N (evenly spaced) or first-middle-last.")
    reward_target: float | None = opt(None, "Minimise |target - reward| instead of -reward.")
    vae_checkpointing: bool = opt(False, "Recompute the VAE decoder's blocks in the backward pass (memory of long or "
                                  "large videos; VAEs that support it: cogvideox, ltx).")  # fmt: skip

    def check_refl(self) -> None:
        self._check(self.backprop_steps >= 1, "backprop_steps", "must be at least 1")
        self._check(self.backprop_mode in ("last", "random"), "backprop_mode", "must be last or random")
        ok = self.reward_frames in ("all", "first-middle-last") or (
            self.reward_frames.isdigit() and int(self.reward_frames) > 0
        )
        self._check(ok, "reward_frames", "must be all, a positive number or first-middle-last")


@dataclass
class ReflConfig(ReflOptions, CheckpointOptions, RolloutOptions, TrainConfig):
    def __post_init__(self):
        super().__post_init__()
        self._check(bool(self.prompts), "prompts", "is required")
        self.check_checkpoints()
        self.check_refl()


# The policy-gradient estimators of train-scst and loop --algo scst: name -> what it trains on. Forward-process ones
# (awm, nft) regress on the rollouts' clean latents and need no per-step log-probabilities (training/forward.py).
ESTIMATORS = {
    "nft": "DiffusionNFT: implicit positive and negative policies on the rollouts' clean latents",
    "awm": "advantage-weighted flow matching on the rollouts' clean latents",
    "logp": "REINFORCE / PPO on each denoising step's log-probability (Flow-GRPO, DanceGRPO)",
}
BASELINES = ("greedy", "group-mean", "leave-one-out")
NFT_OLD = ("current", "sampler")


@dataclass
class ScstLossOptions:
    """The policy-gradient options of ``train-scst`` and ``loop --algo scst``."""

    estimator: str = opt("nft", "nft (DiffusionNFT), awm (advantage-weighted flow matching): the denoising "
                         "regression on the rollouts' clean latents, any sampler; or logp (REINFORCE / PPO on the "
                         "SDE steps' log-probabilities).")  # fmt: skip
    adv_clip: float = opt(5.0, "Clip advantages to +-this (0 disables); nft: its adv_clip_max (0: 5).")
    clip_eps: float = opt(1e-4, "logp: PPO ratio clip, for --ppo-epochs > 1 and stored rollouts (--samples, loop).")
    kl_beta: float = opt(0.0, "KL to the base model (0: off). logp: weight of the Gaussian KL of the step means "
                         "(divided by the step variance, about 20-40x Flow-GRPO's term at the same value); nft, awm: "
                         "weight of mean((out - out_base)^2), DiffusionNFT's term (about 1e-4).")  # fmt: skip
    train_fraction: float = opt(1.0, "logp: fraction of each trajectory's steps to train on (--step-window).")
    step_window: str = opt("random", "logp: which steps --train-fraction keeps: random, high-noise (the first "
                           "ones) or drop-last (all but the last, Flow-GRPO's).")  # fmt: skip
    timesteps: int = opt(2, "nft, awm: timesteps drawn per video and optimizer step.")
    share_noise: bool = opt(True, "nft, awm: a prompt's candidates share timestep and noise.")
    nft_beta: float = opt(1.0, "nft: how far the implicit policies lie from the old one (its beta; 1.0 or 0.1).")
    nft_old: str = opt("sampler", "nft: the old policy v_old of the implicit ones: sampler (default: the policy "
                       "that made the rollouts, frozen while they are trained on, as DiffusionNFT; a trust region) "
                       "or current (the policy itself, detached: no trust region).")  # fmt: skip
    self_normalize: bool = opt(False, "awm: divide each video's error by its mean absolute error (NFT's weight).")

    def check_scst(self) -> None:
        self._check(self.estimator in ESTIMATORS, "estimator", f"must be one of {', '.join(ESTIMATORS)}")
        self._check(0 < self.train_fraction <= 1, "train_fraction", "must be in (0, 1]")
        windows = ("random", "high-noise", "drop-last")
        self._check(self.step_window in windows, "step_window", f"must be one of {', '.join(windows)}")
        self._check(self.timesteps >= 1, "timesteps", "must be at least 1")
        self._check(self.nft_beta > 0, "nft_beta", "must be > 0")
        self._check(self.nft_old in NFT_OLD, "nft_old", f"must be one of {', '.join(NFT_OLD)}")
        self._check(self.adv_clip >= 0, "adv_clip", "must be >= 0 (0 disables)")


@dataclass
class ScstConfig(ScstLossOptions, CheckpointOptions, RolloutOptions, TrainConfig):
    samples: str = opt("", "Offline: stored rollouts, a samples.parquet from `vpotool sample --save-trajectory` "
                       "(instead of --prompts).")  # fmt: skip
    scores: str = opt("", "Offline: the scores.parquet of --samples, from `vpotool score`.")
    reward: str | None = opt(None, "Reward name (default temporal); with --samples: which reward of --scores "
                             "(needed when it holds several).")  # fmt: skip
    noise_level: float | None = opt(None, "Noise of the rollout steps (flow SDE level, or DDIM eta; default 0.7 "
                                    "for logp and a greedy baseline, else 0: the ODE); with --samples: the samples' "
                                    "own.")  # fmt: skip
    baseline: str | None = opt(None, "greedy (default): the deterministic sample from the same noise; group-mean: "
                               "K samples (with --samples: the prompt's stored candidates); leave-one-out: K samples, "
                               "each against the mean of the others.")  # fmt: skip
    group_size: int = opt(4, "Samples per prompt for --baseline group-mean (with --samples: the stored ones).")
    normalize: bool = opt(False, "Scale advantages to unit RMS over the batch.")
    ppo_epochs: int = opt(1, "Optimizer passes over each batch of rollouts (> 1 uses the clipped ratio).")
    advantage: str = opt(
        "video",
        "Autoregressive models: video (one advantage for every step) or chunk (each "
        "chunk's steps get the mean advantage of it and the chunks after it; greedy baseline).",
    )
    context: str = opt(
        "own",
        "Autoregressive models: own (each chunk beside the chunks the model made: "
        "Self-Forcing) or teacher (beside the ground-truth clip: teacher forcing; world prompts).",
    )

    def __post_init__(self):
        super().__post_init__()
        self.check_checkpoints()
        self.check_scst()
        offline = bool(self.samples)
        why = "is required (or --samples with --scores, to train on stored rollouts)"
        self._check(bool(self.prompts) or offline, "prompts", why)
        why = "and --samples exclude each other: sample online from --prompts, or train on the stored --samples"
        self._check(not (offline and self.prompts), "prompts", why)
        self._check(bool(self.scores) or not offline, "scores", "is required with --samples (run `vpotool score`)")
        self._check(offline or not self.scores, "samples", "is required with --scores")
        if self.baseline is None:
            self.baseline = "group-mean" if offline else "greedy"
        logp = self.estimator == "logp"
        if not offline:  # offline, the stored rollouts decide the reward and the noise level
            self.reward = self.reward or "temporal"
            if self.noise_level is None:
                self.noise_level = 0.7 if logp or self.baseline == "greedy" else 0.0
        ok = self.noise_level is None or self.noise_level > 0 or not logp
        self._check(ok, "noise_level", "must be > 0 for --estimator logp (policy gradients need stochastic steps)")
        why = "must be > 0 with --baseline greedy (the greedy rollout is the sample itself on the ODE)"
        self._check(self.noise_level is None or self.noise_level > 0 or self.baseline != "greedy", "noise_level", why)
        self._check(self.baseline in BASELINES, "baseline", f"must be one of {', '.join(BASELINES)}")
        why = "must be group-mean or leave-one-out with --samples (stored rollouts carry no greedy sample; each "
        why += "prompt needs >= 2 scored candidates)"
        self._check(not offline or self.baseline != "greedy", "baseline", why)
        self._check(self.group_size >= 2 or self.baseline == "greedy", "group_size", "must be at least 2")
        self._check(self.ppo_epochs >= 1, "ppo_epochs", "must be at least 1")
        self._check(self.advantage in ("video", "chunk"), "advantage", "must be video or chunk")
        self._check(self.context in ("own", "teacher"), "context", "must be own or teacher")
        for name, plain in (("advantage", "video"), ("context", "own")):
            why = f"{getattr(self, name)} needs rollouts sampled now (--prompts), not stored --samples"
            self._check(not offline or getattr(self, name) == plain, name, why)
        why = "chunk needs --baseline greedy (each chunk against the greedy rollout's same chunk)"
        self._check(self.advantage == "video" or self.baseline == "greedy", "advantage", why)


@dataclass
class LoopConfig(ScstLossOptions, ReflOptions, DpoOptions, RolloutOptions, TrainConfig):
    """``vpotool loop``: sample, score, pair and train online in one process (OnlineVPO), or ReFL / SCST steps.

    The method options are the trainers' own (:class:`DpoOptions`, :class:`ReflOptions`, :class:`ScstLossOptions`);
    the fields below are the loop's, and the few trainer defaults it changes for its short online runs, each
    saying why."""

    out: str = opt("runs/loop", "Run folder: iter-NNNN/ manifests, checkpoints/, metrics.parquet, eval/.")
    algo: str = opt("dpo", "dpo (OnlineVPO), refl (reward gradients) or scst (policy optimisation on the K "
                    "candidates' rewards, --estimator).")  # fmt: skip
    prompts: str = opt("world:align", "Training prompts: a .txt, a prompts .parquet, or a world split "
                       "(world:align: the training prompts less world:val).")  # fmt: skip
    reward: str = opt("world", "Reward to score candidates with (and to optimise, for refl and scst).")
    iterations: int = opt(12, "Sample-score-train iterations.")
    prompts_per_iter: int = opt(16, "Prompts sampled per iteration.")
    candidates: int = opt(4, "Candidate videos per prompt (K).")
    steps_per_iter: int = opt(24, "Optimizer steps per iteration.")
    max_steps: int = opt(0, "Stop after this many optimizer steps in all (0: iterations x steps-per-iter).")
    # Measured on the tiny model (docs/training.md): 1e-3 made it flicker; a rank-8 adapter suffices for ~100 steps.
    lr: float = opt(2e-4, "Peak learning rate (AdamW).")
    lora_rank: int = opt(8, "LoRA rank.")
    noise_level: float | None = opt(None, "Sampling noise (0: ODE; default 0.7 for scst --estimator logp, else 0).")
    sample_batch_size: int = opt(16, "Videos per denoiser call while sampling.")
    # Every pair above a margin: more pairs per sampled video than best-worst (docs/training.md measures both).
    pair_strategy: str = opt("all", "all: every pair above the margin; best-worst: one pair per prompt.")
    min_margin: float | None = opt(None, "Skip pairs whose score difference is below this (default: the reward's "
                                   "own margin, 0.02 for world; 0 for the others).")  # fmt: skip
    # OnlineVPO's curriculum reference (every two iterations), where train-dpo keeps the base.
    ref_update_interval: int = opt(48, "dpo: copy the policy into the reference every N steps (0: the base model).")
    # The loop trains SCST on its own K candidates (group-mean baseline); half the steps per update halve its cost.
    train_fraction: float = opt(0.5, "scst logp: fraction of each trajectory's steps to train on (--step-window).")
    baseline: str = opt("group-mean", "scst: group-mean (the mean reward of a prompt's K candidates, over their std) "
                        "or leave-one-out (each against the mean of the others).")  # fmt: skip
    eval_prompts: str | None = opt(None, "Prompts to compare base and aligned on at the end (default: world:val "
                                   "after world:align, world:heldout after other splits; none: skip).")  # fmt: skip
    eval_seeds: int = opt(4, "Videos per prompt in the final comparison.")
    # Not --seed: runs that differ only in their training seed compare on the same videos, so their spread is
    # the training's and not the comparison's draw (docs/training.md measures both).
    eval_seed: int = opt(0, "Base seed of the final comparison's videos.")

    def __post_init__(self):
        self._check(self.max_steps >= 0, "max_steps", "must be >= 0")
        for name in ("iterations", "prompts_per_iter", "steps_per_iter", "sample_batch_size", "eval_seeds"):
            self._check(getattr(self, name) >= 1, name, "must be at least 1")
        self.max_steps = self.max_steps or self.iterations * self.steps_per_iter
        if self.min_margin is None:
            from vpotool.rewards import default_pair_margin

            self.min_margin = default_pair_margin(self.reward)
        super().__post_init__()
        self._check(self.algo in ("dpo", "refl", "scst"), "algo", "must be dpo, refl or scst")
        need = 2 if self.algo in ("dpo", "scst") else 1
        self._check(self.candidates >= need, "candidates", f"must be at least {need} for --algo {self.algo}")
        self._check(self.noise_level is None or self.noise_level >= 0, "noise_level", "must be >= 0")
        if self.algo == "scst" and self.estimator == "logp":
            why = "must be > 0 for scst --estimator logp (policy gradients need stochastic steps)"
            self._check(self.noise_level is None or self.noise_level > 0, "noise_level", why)
        self._check(self.baseline in BASELINES[1:], "baseline", f"must be one of {', '.join(BASELINES[1:])}")
        self._check(self.pair_strategy in ("best-worst", "all"), "pair_strategy", "must be best-worst or all")
        self.check_dpo()
        self.check_refl()
        self.check_scst()
