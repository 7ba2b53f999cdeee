"""The lab: experiments that reproduce a paper's figure on the shipped task, one command each.

    overoptimization   proxy reward models over-optimised by best-of-n, PPO and GRPO; the gold score
                       peaks and falls as KL to SFT grows; the reward–KL frontier of every method
                       (Gao, Schulman & Hilton 2022)

``minirlhf lab <experiment> --out DIR [--quick] [--seed N]`` runs ``EXPERIMENTS[experiment]``.
"""
from .overoptimization import run_overoptimization

EXPERIMENTS = {
    "overoptimization": run_overoptimization,
}
