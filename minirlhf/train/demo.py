"""The whole RLHF pipeline on the shipped addition task: ``minirlhf demo``.

    tokenizer ─▶ SFT on demonstrations (a budget that leaves the model partly right)
              ─▶ preference pairs: SFT samples + perturbed answers, labelled by a hidden rater (Bradley-Terry)
              ─▶ reward model (BT loss)       ─▶ PPO against the reward model, KL to SFT
              ─▶ GRPO on the rule reward       (groups of G samples, k3 KL to SFT)
              ─▶ DPO on the preference pairs   (offline, reference = SFT)
              ─▶ RLOO on the rule reward       (the plain policy-gradient baseline)

Each stage runs exactly as ``minirlhf <stage>`` would (the registry in ``stages.py``) into its own
folder under ``--out``. Every policy is evaluated on held-out problems that no stage trains on:
pass@1 accuracy (samples at temperature 1), greedy accuracy, the hidden gold reward, and KL to SFT.

The same seed gives the same results.json (seconds aside) on the same machine and library versions.
Another CPU or NumPy build sums in another order (BLAS), and training amplifies the last-bit
differences: the same code gave SFT greedy accuracy 0.820 on one machine and 0.690 on another. The
SFT stage is also sensitive to the order of its examples: at --quick size, four orderings of the
same demonstrations gave held-out pass@1 from 0.20 to 0.54, so its figure is one draw, not a constant.
"""
import os
import sys
import time
from dataclasses import asdict

from ..distributed import world
from ..tasks.environment import AdditionEnvironment
from .stages import STAGES, Inputs, prepare_folder, prepare_out, run_stage, stage_settings, write_json

POLICY_STAGES = ("sft", "ppo", "grpo", "dpo", "rloo")

KL_ESTIMATOR = ("exact per-token KL(pi || pi_sft) over the vocabulary, summed over the response and averaged "
                "over held-out samples at temperature 1")


def run_demo(out="minirlhf-demo", quick=False, seed=0, progress=True, stream=None, overwrite=False):
    """Run every stage, write ``out/results.json`` (and a plot if matplotlib is there); return the results."""
    stream = stream if stream is not None else sys.stdout
    prepare_folder(out, overwrite, "demo")
    started = time.time()
    histories, stages, timings, settings = {}, {}, {}, {}
    inputs = None
    for name, stage in STAGES.items():
        t = time.time()
        configs = stage_settings(stage, quick, inherited={"seed": seed})
        settings[name] = {cls.__name__: asdict(c) for cls, c in zip(stage.configs, configs)}
        if inputs is None:
            inputs = Inputs(AdditionEnvironment(configs[1], seed), seed)
        folder = os.path.join(out, name)
        prepare_out(folder, name, overwrite=True)
        reads = {r: os.path.join(out, r) for r in stage.reads}
        _, histories[name], stages[name] = run_stage(stage, folder, inputs, configs, progress=progress, reads=reads)
        timings[name] = round(time.time() - t, 1)
    results = {"seconds": round(time.time() - started, 1), "seed": seed, "quick": quick,
               "kl_estimator": KL_ESTIMATOR, "stages": stages, "settings": settings}
    write_json(os.path.join(out, "results.json"), results)
    write_json(os.path.join(out, "timings.json"), {"seconds": results["seconds"], "stages": timings})
    write_json(os.path.join(out, "run.json"), {"stage": "demo", "seed": seed, "quick": quick, "finished": True})
    if world().rank == 0:
        stream.write(format_table(results) + "\n")
        stream.write(save_plot(histories, os.path.join(out, "training.png")) + "\n")
    return results


def format_table(results):
    """The results as a text table; a stage whose greedy accuracy is below the SFT model's is flagged."""
    stages = results["stages"]
    sft_greedy = stages["sft"]["greedy_accuracy"]
    lines = [f"{'stage':<6} {'pass@1':>7} {'greedy':>7} {'gold':>6} {'KL(sft)':>8}",
             "-" * 38]
    for name in POLICY_STAGES:
        if name not in stages:
            continue
        s = stages[name]
        flag = "  << greedy below SFT" if s["greedy_accuracy"] < sft_greedy else ""
        lines.append(f"{name:<6} {s['accuracy']:>7.3f} {s['greedy_accuracy']:>7.3f} {s['gold_reward']:>6.3f} "
                     f"{s['kl_to_sft']:>8.3f}{flag}")
    if "rm" in stages:
        lines.append(f"reward model: held-out pair accuracy {stages['rm']['pair_accuracy']:.3f} "
                     f"({stages['rm']['heldout_pairs']} pairs ordered by the gold score)")
    lines.append(f"pass@1 = mean rule reward of samples at temperature 1; KL = {results['kl_estimator']}")
    lines.append(f"total {results['seconds']:.0f} s")
    return "\n".join(lines)


def save_plot(histories, path):
    """Reward and KL against steps for each trainer (a PNG); says how to get matplotlib if it is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in ("ppo", "grpo", "rloo"):
        steps = [m["step"] for m in histories.get(name, [])]
        axes[0].plot(steps, [m["reward"] for m in histories[name]], label=name)
        axes[1].plot(steps, [m["objective/kl"] for m in histories[name]], label=name)
    dpo = histories.get("dpo", [])
    axes[2].plot([m["step"] for m in dpo], [m["rewards/margins"] for m in dpo], label="dpo")
    titles = ("reward (PPO: reward model; GRPO, RLOO: rule)",
              "objective/kl: Σ_t log π/π_sft per response (k1, on rollouts)",
              "DPO rewards/margins: β log π/π_sft, chosen − rejected")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: {path}"
