"""Where DPO's probability mass goes: chosen and rejected log-probs, implicit rewards and margin over
training, for three DPO losses at two β, with the gold reward and the KL to the SFT model.

DPO (Rafailov et al. 2023, eq. 7) minimises −log σ(β h), h = log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l):
it only asks the *margin* to grow. Nothing holds log π(y_w) up, and both log-probabilities often fall
together, the chosen one more slowly ("likelihood displacement", Razin et al. 2024; Rafailov et al.
2024, "From r to Q*", §5): the mass leaves both answers of the pairs and goes elsewhere — to other
answers, good or bad. IPO (Azar et al. 2023, eq. 17) regresses h to 1/(2β) instead of pushing it to ∞;
robust DPO (Chowdhury et al. 2024) assumes a label-flip rate ε.

Run: the SFT model, preference pairs labelled by the hidden rater (tasks/preferences.py), then
train_dpo for each (loss, β) from the same start, with the trainer's own per-step metrics and, every
``eval_every`` steps, held-out samples scored by the gold score and the exact KL to the SFT model
(train/evaluate.py), taken through the trainer's ``log`` hook.
"""
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..tasks.environment import PreferenceConfig
from ..tensor import no_grad
from ..train.dpo import DPOConfig, pair_logprobs, train_dpo
from ..train.evaluate import evaluate_policy
from ..train.stages import QUICK as STAGE_QUICK
from ..train.stages import prepare_folder
from . import report
from .starting_point import starting_point

LOSSES = {"sigmoid": 0.0, "ipo": 0.0, "robust": 0.1}  # loss_type: label_smoothing ε


@dataclass
class DPODynamicsConfig:
    steps: int = 300               # DPO steps of each run
    lr: float = 1e-4               # AdamW learning rate
    batch_size: int = 64           # pairs per step
    betas: tuple = (0.1, 0.5)      # the two β
    eval_every: int = 50           # steps between held-out evaluations
    eval_prompts: int = 100        # held-out prompts of each evaluation (4 samples each)
    tracked_pairs: int = 256       # training pairs whose log-probs every evaluation follows


QUICK = {"steps": 40, "batch_size": 32, "betas": (0.1,), "eval_every": 10, "eval_prompts": 40}


def dpo_run(inputs, pairs, loss_type, beta, config):
    """One DPO run from the SFT model: the trainer's per-step metrics and the held-out evaluations."""
    env = inputs.env
    policy = inputs.sft.copy()
    prompts = env.heldout_prompts[:config.eval_prompts]
    tracked = pairs[:config.tracked_pairs]
    evaluations = []

    def evaluate(step):
        metrics = evaluate_policy(policy, inputs.sft, prompts, env.rule_reward("heldout"), env.gold_score("heldout"),
                                  env.eos_id, env.pad_id, env.max_new_tokens, seed=inputs.seed + 17)
        with no_grad():
            chosen, rejected = pair_logprobs(policy, tracked, env.pad_id)
        evaluations.append({"step": step, **metrics, "logps/chosen": float(chosen.data.mean()),
                            "logps/rejected": float(rejected.data.mean())})

    def log(metrics):
        if metrics["step"] % config.eval_every == 0 or metrics["step"] == config.steps:
            evaluate(metrics["step"])

    evaluate(0)
    dpo = DPOConfig(steps=config.steps, lr=config.lr, batch_size=config.batch_size, beta=beta, loss_type=loss_type,
                    label_smoothing=LOSSES[loss_type], seed=inputs.seed)
    history = train_dpo(policy, inputs.sft, pairs, dpo, env.pad_id, log=log, progress=False)
    return {"history": history, "evaluations": evaluations, **summary(history, evaluations)}


def summary(history, evaluations, window=10):
    """Mean log π of the tracked chosen and rejected responses before and after training, and the
    trainer's margin and pair accuracy over the last ``window`` steps."""
    first, last = evaluations[0], evaluations[-1]
    c0, c1, r0, r1 = first["logps/chosen"], last["logps/chosen"], first["logps/rejected"], last["logps/rejected"]
    return {"logps_chosen_start_end": [c0, c1], "logps_rejected_start_end": [r0, r1],
            "both_fell": bool(c1 < c0 and r1 < r0),
            "margin_end": float(np.mean([h["rewards/margins"] for h in history[-window:]])),
            "accuracy_end": float(np.mean([h["rewards/accuracies"] for h in history[-window:]]))}


def run(out, quick=False, seed=0, sft=None, progress=True, overwrite=False, **overrides):
    """Write ``out/results.json`` and ``out/dpo_dynamics.png``; returns the results."""
    config = DPODynamicsConfig(**{**(QUICK if quick else {}), **overrides})
    prepare_folder(out, overwrite, "lab run")
    start = time.time()
    inputs = starting_point(out, seed, quick, sft, progress)
    preferences = PreferenceConfig(**STAGE_QUICK["PreferenceConfig"]) if quick else PreferenceConfig(pair_prompts=1000)
    pairs, _ = inputs.env.preference_pairs(inputs.sft, preferences, inputs.seed)
    runs = {}
    for beta in config.betas:
        for loss_type in LOSSES:
            runs[f"{loss_type}, β={beta}"] = dpo_run(inputs, pairs, loss_type, beta, config)
            if progress:
                r = runs[f"{loss_type}, β={beta}"]
                print(f"dpo {loss_type} β={beta}: log π chosen {r['logps_chosen_start_end']}, rejected "
                      f"{r['logps_rejected_start_end']}, gold {r['evaluations'][-1]['gold_reward']:.3f}")
    results = {"experiment": "dpo", "seed": seed, "quick": quick, "settings": asdict(config),
               "preferences": asdict(preferences), "pairs": len(pairs), "runs": runs}
    return report.finish(out, results, start, plot)


def plot(results, out):
    plt = report.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    for i, (name, r) in enumerate(results["runs"].items()):
        color, style = f"C{i % 3}", "-" if i < 3 else "--"
        ev = r["evaluations"]
        for ax, key, title in zip(axes[0][:2], ("logps/chosen", "logps/rejected"),
                                  ("log π(y_w), tracked training pairs", "log π(y_l), tracked training pairs")):
            ax.plot([e["step"] for e in ev], [e[key] for e in ev], style + "o", color=color, label=name)
            ax.set(title=title, xlabel="step")
        steps = [h["step"] for h in r["history"]]
        margins = np.convolve([h["rewards/margins"] for h in r["history"]], np.ones(5) / 5, mode="valid")
        axes[0][2].plot(steps[4:], margins, style, color=color, label=name)
        axes[0][2].set(title="implicit reward margin β·h (batch, 5-step mean)", xlabel="step")
        for ax, key, title in zip(axes[1], ("gold_reward", "kl_to_sft", "accuracy"),
                                  ("held-out gold reward of samples", "exact KL(π ‖ π_SFT) per response",
                                   "held-out accuracy (pass@1)")):
            ax.plot([e["step"] for e in ev], [e[key] for e in ev], style + "o", color=color, label=name)
            ax.set(title=title, xlabel="step")
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    return report.save(fig, out, "dpo_dynamics.png")
