"""Entropy collapse and clip-higher: GRPO's policy entropy and reward over training, with the upper
clip ε_high = ε or larger (0.28), with and without the KL term.

Cui et al. (2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models")
find that, without intervention, reward is bought with entropy along an empirical law

    R = −a · e^H + b                                  (their eq. 1)

so that the reward ceiling is −a + b at H = 0: once entropy has collapsed, nothing is left to explore.
DAPO (Yu et al. 2025, §3.1, "clip-higher") raises the upper clip of the ratio, ρ <= 1 + ε_high with
ε_high = 0.28 > ε = 0.2, so that low-probability tokens with A > 0 can grow faster than the symmetric
clip allows; the KL term β·k3 to the SFT model (Shao et al. 2024, eq. 4) holds the policy near it.

Clipping needs π ≠ π_old, so each rollout is optimised for ``epochs`` > 1 passes. The fit of R on e^H
is least squares over the training steps of each run (TRL's ``entropy`` and ``reward``, per step).
The trainer reports the share of tokens where the clipped branch is taken (clip_ratio/region_mean), and
of those, the tokens held at the upper bound (ρ > 1 + ε_high, A > 0: clip_ratio/high_mean) and at the
lower one (ρ < 1 − ε, A < 0: clip_ratio/low_mean).
"""
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..train.grpo import GRPOConfig, train_grpo
from ..train.stages import prepare_folder
from . import report
from .starting_point import starting_point

RUNS = {"ε_high=0.2, β=0.04": (0.2, 0.04), "ε_high=0.28, β=0.04": (0.28, 0.04),
        "ε_high=0.2, β=0": (0.2, 0.0), "ε_high=0.28, β=0": (0.28, 0.0)}


@dataclass
class EntropyConfig:
    steps: int = 150               # GRPO steps of each run
    lr: float = 3e-4               # AdamW learning rate
    prompts_per_step: int = 16     # prompts per step
    group_size: int = 8            # responses per prompt
    epochs: int = 2                # passes over each rollout (clipping needs more than one)


QUICK = {"steps": 12, "prompts_per_step": 8}


def fit_entropy_law(entropy, reward):
    """Least squares R = −a·e^H + b over the steps: (a, b, R² of the fit)."""
    x, y = np.exp(np.asarray(entropy)), np.asarray(reward)
    slope, b = np.polyfit(x, y, 1)
    residual = y - (slope * x + b)
    total = ((y - y.mean()) ** 2).sum()
    return float(-slope), float(b), float(1 - (residual ** 2).sum() / total) if total > 0 else 0.0


def run(out, quick=False, seed=0, sft=None, progress=True, overwrite=False, **overrides):
    """Write ``out/results.json`` and ``out/entropy.png``; returns the results."""
    config = EntropyConfig(**{**(QUICK if quick else {}), **overrides})
    prepare_folder(out, overwrite, "lab run")
    start = time.time()
    inputs = starting_point(out, seed, quick, sft, progress)
    env = inputs.env
    runs = {}
    for name, (clip_eps_high, beta) in RUNS.items():
        policy = inputs.sft.copy()
        grpo = GRPOConfig(steps=config.steps, lr=config.lr, prompts_per_step=config.prompts_per_step,
                          group_size=config.group_size, epochs=config.epochs, clip_eps=0.2,
                          clip_eps_high=clip_eps_high, beta=beta, max_new_tokens=env.max_new_tokens,
                          seed=inputs.seed)
        history = train_grpo(policy, inputs.sft, env.train_prompts, env.rule_reward("train"), grpo, env.eos_id,
                             env.pad_id, progress=progress)
        entropy = [h["entropy"] for h in history]
        reward = [h["reward"] for h in history]
        a, b, r2 = fit_entropy_law(entropy, reward)
        runs[name] = {"history": history, "fit": {"a": a, "b": b, "r2": r2, "ceiling_at_H0": b - a},
                      "entropy_start_end": [float(np.mean(entropy[:5])), float(np.mean(entropy[-5:]))],
                      "reward_start_end": [float(np.mean(reward[:5])), float(np.mean(reward[-5:]))],
                      **{f"{key}_mean": float(np.mean([h[f"clip_ratio/{key}_mean"] for h in history]))
                         for key in ("region", "low", "high")}}
    results = {"experiment": "entropy", "seed": seed, "quick": quick, "settings": asdict(config), "runs": runs}
    return report.finish(out, results, start, plot)


def plot(results, out):
    plt = report.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    for i, (name, r) in enumerate(results["runs"].items()):
        h = r["history"]
        steps = [x["step"] for x in h]
        for ax, key in zip(axes[:2], ("entropy", "reward")):
            ax.plot(steps, [x[key] for x in h], color=f"C{i}", label=name)
            ax.set(title=key, xlabel="step")
        axes[2].plot(steps, [x["clip_ratio/high_mean"] for x in h], color=f"C{i}")
        axes[2].plot(steps, [x["clip_ratio/low_mean"] for x in h], color=f"C{i}", linestyle=":")
        axes[2].set(title="share of tokens clipped at 1 + ε_high (solid), at 1 − ε (dotted)", xlabel="step")
        H = np.array([x["entropy"] for x in h])
        axes[3].plot(H, [x["reward"] for x in h], ".", color=f"C{i}", alpha=0.5)
        grid = np.linspace(0, H.max(), 50)
        fit = r["fit"]
        axes[3].plot(grid, -fit["a"] * np.exp(grid) + fit["b"], color=f"C{i}",
                     label=f"a={fit['a']:.2f} b={fit['b']:.2f} R²={fit['r2']:.2f}")
    axes[0].set_ylabel("mean token entropy (nats)")
    axes[0].legend(fontsize=8)
    axes[3].set(title="R = −a·e^H + b (Cui et al. 2025, eq. 1)", xlabel="entropy H", ylabel="reward")
    axes[3].legend(fontsize=7)
    return report.save(fig, out, "entropy.png")
