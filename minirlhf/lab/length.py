"""Loss aggregation and length bias: GRPO's four ``loss_type``s from the same SFT model, on the addition
task with optional working (tasks/working.py), where a response can grow or shrink without changing
whether it is right.

Each aggregation gives token t of response i (length |y_i|, G per group, B in the batch, T the padded
length) a weight w_i in the loss Σ_i Σ_t w_i · ℓ_{i,t} (losses.grpo_loss):

    grpo     w_i = 1 / (B · |y_i|)     the paper's mean over each response's tokens (Shao et al. 2024, eq. 3)
    bnpo     w_i = 1 / Σ_j |y_j|       one token mean over the batch
    dapo     w_i = 1 / Σ_j |y_j|       the same, as DAPO names it (Yu et al. 2025, eq. 8)
    dr_grpo  w_i = 1 / (B · T)         a constant (Liu et al. 2025, "Understanding R1-Zero-like training", §3.1)

Under "grpo" a long response's tokens each weigh less: a correct answer (A > 0) gains most per token
by being short, and a wrong one (A < 0) is punished least per token by being long — Dr. GRPO's
explanation of why wrong answers grow under GRPO. The token-level aggregations weigh every token
alike, so length has no such pull. The run records, at every step, the mean length of the correct and
of the wrong responses in the batch (through the reward function, which sees every response).
The KL term is off (β = 0), as in DAPO and Dr. GRPO, so that only the aggregation differs.
"""
import time
from dataclasses import asdict, dataclass

import numpy as np

from .. import backend
from ..model import GPT, GPTConfig
from ..tasks.environment import TaskConfig
from ..tasks.working import WorkingEnvironment
from ..train.grpo import GRPOConfig, train_grpo
from ..train.sft import SFTConfig, train_sft
from ..train.stages import QUICK as STAGE_QUICK
from ..train.stages import ModelConfig
from ..train.stages import prepare_folder
from . import report

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class LengthConfig:
    sft_steps: int = 1200          # SFT steps on demonstrations with 0..max_working restatements (400: 5% right)
    max_working: int = 2           # most restatements of the sum before the answer in a demonstration
    steps: int = 100               # GRPO steps of each run
    lr: float = 3e-4               # GRPO's AdamW learning rate
    prompts_per_step: int = 8      # prompts per GRPO step
    group_size: int = 8            # responses per prompt


QUICK = {"sft_steps": 100, "steps": 6, "prompts_per_step": 4}


class LengthRecorder:
    """A reward function that scores with ``reward_fn`` and records each call's mean length (tokens,
    <|im_end|> included) of the correct and of the wrong responses (None when there are none)."""

    def __init__(self, reward_fn):
        self.reward_fn, self.steps = reward_fn, []

    def __call__(self, index, responses):
        rewards = np.asarray(self.reward_fn(index, responses), dtype=np.float64)
        lengths = np.array([len(r) for r in responses], dtype=np.float64)
        right = rewards > 0.5
        self.steps.append({"reward": float(rewards.mean()), "length": float(lengths.mean()),
                           "length_correct": float(lengths[right].mean()) if right.any() else None,
                           "length_wrong": float(lengths[~right].mean()) if (~right).any() else None})
        return rewards


def working_sft(env, config, seed, progress):
    """A fresh GPT fine-tuned on demonstrations with optional working (room for the longest response)."""
    backend.manual_seed(seed)
    size = ModelConfig(block_size=40)
    model = GPT(GPTConfig(vocab_size=env.tokenizer.vocab_size, n_layer=size.n_layer, n_head=size.n_head,
                          n_embd=size.n_embd, block_size=size.block_size))
    sft = SFTConfig(steps=config.sft_steps, seed=seed)
    train_sft(model, env.demonstrations(sft.steps * sft.batch_size, seed), sft, env.pad_id, progress=progress)
    return model


def run(out, quick=False, seed=0, progress=True, overwrite=False, **overrides):
    """Write ``out/results.json`` and ``out/length.png``; returns the results."""
    config = LengthConfig(**{**(QUICK if quick else {}), **overrides})
    prepare_folder(out, overwrite, "lab run")
    start = time.time()
    env = WorkingEnvironment(TaskConfig(**STAGE_QUICK["TaskConfig"]), seed, config.max_working)
    sft = working_sft(env, config, seed, progress)
    runs = {}
    for loss_type in LOSS_TYPES:
        policy = sft.copy()
        recorder = LengthRecorder(env.rule_reward("train"))
        grpo = GRPOConfig(steps=config.steps, lr=config.lr, prompts_per_step=config.prompts_per_step,
                          group_size=config.group_size, beta=0.0, loss_type=loss_type,
                          max_new_tokens=env.max_new_tokens, seed=seed)
        train_grpo(policy, sft, env.train_prompts, recorder, grpo, env.eos_id, env.pad_id, progress=progress)
        runs[loss_type] = {"steps": recorder.steps, **ends(recorder.steps)}
    results = {"experiment": "length", "seed": seed, "quick": quick, "settings": asdict(config),
               "max_new_tokens": env.max_new_tokens, "runs": runs}
    return report.finish(out, results, start, plot)


def ends(steps, window=5):
    """Means over the first and last ``window`` steps of the length (all, correct, wrong) and the reward."""
    def mean(part, key):
        values = [s[key] for s in part if s[key] is not None]
        return float(np.mean(values)) if values else None
    return {f"{key}_start_end": [mean(steps[:window], key), mean(steps[-window:], key)]
            for key in ("length", "length_correct", "length_wrong", "reward")}


def plot(results, out):
    plt = report.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for i, (loss_type, r) in enumerate(results["runs"].items()):
        steps = np.arange(1, len(r["steps"]) + 1)
        for ax, key, title in zip(axes, ("length_correct", "length_wrong", "reward"),
                                  ("mean length of correct responses (tokens)", "mean length of wrong responses",
                                   "reward (share correct)")):
            values = np.array([np.nan if s[key] is None else s[key] for s in r["steps"]])
            ax.plot(steps, values, color=f"C{i}", alpha=0.35)
            if len(values) >= 5 and np.isfinite(values).any():  # a run with no right response has no curve
                smooth = np.convolve(np.nan_to_num(values, nan=np.nanmean(values)), np.ones(5) / 5, mode="valid")
                ax.plot(steps[4:], smooth, color=f"C{i}", label=loss_type)
            ax.set(title=title, xlabel="GRPO step")
    axes[0].legend(title="loss_type (5-step mean)")
    return report.save(fig, out, "length.png")
