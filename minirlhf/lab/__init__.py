"""The lab: short, seeded experiments that show what RLHF training does, each writing results.json and a
figure into its output folder.

    kl        the KL estimators k1, k2, k3: their values and the gradient each gives, exactly (exact.py)
    mismatch  the sampler's log-probs against the trainer's, and truncated importance sampling

``EXPERIMENTS[name](out=DIR, quick=False, seed=0)`` runs one; ``quick`` is the test-suite size.
"""
from . import kl_estimators, mismatch

EXPERIMENTS = {
    "kl": kl_estimators.run,
    "mismatch": mismatch.run,
}
