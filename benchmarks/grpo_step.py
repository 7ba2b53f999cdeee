"""Benchmark: where the time of one GRPO step goes.

A GRPO step of ``train_grpo`` as the demo runs it (rollout with the KV cache, the rule reward,
group advantages, the reference model's log-probs, the policy's log-probs, the loss, backward,
AdamW) on the shipped addition task: 16 prompts x 8 samples, 5 new tokens, a random-init GPT of
4 layers, 4 heads, 256 wide by default. The step time is the time between the ends of consecutive
steps (the trainer's own loop, metrics included); the median of ``--runs`` steps after two of
warm-up is reported, and ``--profile`` prints cProfile's top entries over those steps.

    python benchmarks/grpo_step.py [--runs 10] [--layers 4] [--width 256] [--profile]

The machine's model name (lscpu) and the BLAS thread variables are printed with the figures.
"""
import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import minirlhf  # noqa: E402
from minirlhf.model import GPT, GPTConfig  # noqa: E402
from minirlhf.tasks.environment import AdditionEnvironment, TaskConfig  # noqa: E402
from minirlhf.train.grpo import GRPOConfig, train_grpo  # noqa: E402
from train_step import cpu_name  # noqa: E402  (benchmarks/, this script's folder)

WARMUP = 2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="timed steps (after two of warm-up)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="cProfile the timed steps and print the top 25")
    args = parser.parse_args()

    minirlhf.backend.keep_freed_memory()  # as the minirlhf command does
    env = AdditionEnvironment(TaskConfig(n_train_prompts=1000), seed=0)
    minirlhf.manual_seed(0)
    cfg = GPTConfig(n_layer=args.layers, n_head=args.heads, n_embd=args.width, vocab_size=env.tokenizer.vocab_size,
                    block_size=32)
    policy = GPT(cfg)
    reference = policy.copy()
    config = GRPOConfig(steps=WARMUP + args.runs, prompts_per_step=16, group_size=8,
                        max_new_tokens=env.max_new_tokens)

    ends = []
    prof = cProfile.Profile()

    def log(metrics):
        ends.append(time.perf_counter())
        if args.profile and len(ends) == WARMUP:
            prof.enable()

    ends.append(time.perf_counter())
    train_grpo(policy, reference, env.train_prompts, env.rule_reward("train"), config, env.eos_id, env.pad_id,
               log=log, progress=False)
    prof.disable()
    steps = [b - a for a, b in zip(ends, ends[1:])][WARMUP:]
    if args.profile:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    print(f"GRPO step: GPT {args.layers} layers x {args.width} wide ({policy.num_parameters():,} parameters), "
          f"16 prompts x 8 samples, up to {env.max_new_tokens} new tokens, reference model and k3 KL (beta 0.04)")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; numpy {np.__version__}; "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '(unset)')}")
    print(f"median of {len(steps)} steps: {statistics.median(steps) * 1e3:.1f} ms "
          f"(min {min(steps) * 1e3:.1f}, max {max(steps) * 1e3:.1f})")


if __name__ == "__main__":
    main()
