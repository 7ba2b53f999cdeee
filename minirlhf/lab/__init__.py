"""The lab: short, seeded experiments that show what RLHF training does, each writing results.json and a
figure into its output folder (docs/lab.md shows and explains them).

    length    GRPO's loss aggregations (grpo, bnpo, dr_grpo, dapo) and the length of right and wrong answers
    entropy   entropy collapse, the fit R = −a·e^H + b, and DAPO's clip-higher, with and without the KL term
    dpo       where DPO's probability mass goes: chosen and rejected log-probs under sigmoid, IPO, robust DPO
    kl        the KL estimators k1, k2, k3: their values and the gradient each gives, exactly (exact.py)
    mismatch  the sampler's log-probs against the trainer's, and truncated importance sampling

``EXPERIMENTS[name](out=DIR, quick=False, seed=0)`` runs one; ``quick`` is the test-suite size. The ones
that start from an SFT model also take ``sft=DIR``, a finished ``minirlhf sft`` folder (else they train one).
"""
from . import dpo_dynamics, entropy, kl_estimators, length, mismatch

EXPERIMENTS = {
    "length": length.run,
    "entropy": entropy.run,
    "dpo": dpo_dynamics.run,
    "kl": kl_estimators.run,
    "mismatch": mismatch.run,
}
