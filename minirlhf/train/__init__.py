"""Trainers, one file each (sft, reward, ppo, grpo, dpo), each a short loop over the same pieces:

    batch → forward → log-probs → loss (from minirlhf.losses) → backward → clip → optimizer step

with the warmup + cosine learning rate, periodic checkpoints and JSONL metrics.
"""
