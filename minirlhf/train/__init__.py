"""The application layer: one file per stage (sft, reward, ppo, grpo, dpo, rloo), each a short loop

    sample → score → log-probs (minirlhf.rollout) → loss (minirlhf.losses) → backward → step

over the same run machinery (``run.py``: AdamW with warmup + cosine, exact resume, the metrics
log and progress line); their settings (``config.py``), metrics (``metrics.py``), held-out
evaluation (``evaluate.py``), the stage registry (``stages.py``) and the demo (``demo.py``).
"""
