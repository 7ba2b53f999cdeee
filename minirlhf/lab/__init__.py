"""The lab: short, seeded experiments that show what RLHF training does, one command each, each writing
results.json, figures and a report into its output folder (docs/ holds the committed ones).

    overoptimization   proxy reward models over-optimised by best-of-n, PPO and GRPO; the gold score
                       peaks and falls as KL to SFT grows; the reward–KL frontier (Gao, Schulman & Hilton 2022)
    length             GRPO's loss aggregations (grpo, bnpo, dr_grpo, dapo) and the length of right and wrong answers
    entropy            entropy collapse, the fit R = −a·e^H + b, and DAPO's clip-higher, with and without the KL term
    dpo                where DPO's probability mass goes: chosen and rejected log-probs under sigmoid, IPO, robust DPO
    kl                 the KL estimators k1, k2, k3: their values and the gradient each gives, exactly (exact.py)
    mismatch           the sampler's log-probs against the trainer's, and truncated importance sampling

``minirlhf lab <experiment> --out DIR [--quick] [--seed N]`` runs ``EXPERIMENTS[experiment]``; ``quick``
is the test-suite size. Those that start from an SFT model also take ``sft=DIR`` from Python.
"""
from . import dpo_dynamics, entropy, kl_estimators, length, mismatch
from .overoptimization import run_overoptimization

EXPERIMENTS = {
    "overoptimization": run_overoptimization,
    "length": length.run,
    "entropy": entropy.run,
    "dpo": dpo_dynamics.run,
    "kl": kl_estimators.run,
    "mismatch": mismatch.run,
}
