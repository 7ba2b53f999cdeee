"""Supervised fine-tuning: maximise log π(y | x) on (prompt x, response y) pairs.

    L_SFT = − (1 / Σ m) Σ_t m_t · log π(s_{t+1} | s_≤t),     s = x ⧺ y,  m_t = 1 iff s_{t+1} ∈ y

Only response tokens are predicted: the prompt is context, not a target (the first step of the
InstructGPT recipe, Ouyang et al. 2022). For each step:

    1. draw ``grad_accum × batch_size`` distinct examples from the seeded stream, split into micro-batches
    2. for each: logits of [prompt ⧺ response], loss = Σ −log π over its response tokens divided by the
       response tokens of the whole step (losses.sft_loss with num_tokens), backward
    3. clip the global gradient norm, an AdamW step, the next learning rate (warmup + cosine)

Dividing by the step's token count, not each micro-batch's, makes the accumulated gradient that of
one large batch whatever the micro-batches' lengths (averaging per-micro-batch means weights a
short micro-batch's tokens more; ``transformers`` fixed that bug in its trainers in 2024).
"""
from dataclasses import dataclass

import numpy as np

from .. import losses
from ..padding import pad_prompt_response
from ..validation import is_positive_int, require
from .config import TrainConfig
from .run import Run


@dataclass
class SFTConfig(TrainConfig):
    steps: int = 400
    lr: float = 3e-3
    warmup: int = 20
    batch_size: int = 64           # examples per micro-batch
    grad_accum: int = 1            # micro-batches per optimizer step

    def check(self):
        super().check()
        require(self, "batch_size", is_positive_int, "a positive integer")
        require(self, "grad_accum", is_positive_int, "a positive integer")


def sft_batch(examples, pad_id=0):
    """Right-padded inputs, next-token targets and the response mask for a list of (prompt, response) pairs.

    Returns ids (B, T), targets (B, T) with targets[:, t] = s_{t+1}, and loss_mask (B, T)
    with 1 exactly where targets[:, t] is a response token.
    """
    ids, _, is_response = pad_prompt_response(examples, pad_id)
    return ids[:, :-1], ids[:, 1:], is_response[:, 1:]


def train_sft(model, examples, config, pad_id=0, out_dir=None, resume=False, log=None, progress=True):
    """Fine-tune ``model`` on ``examples`` (a list of (prompt_ids, response_ids)); returns per-step metrics.

    ``out_dir``: checkpoints go to ``out_dir/checkpoint`` every ``checkpoint_every`` steps and at the
    end; ``resume=True`` continues from there exactly. ``log``: a JSONL path that each step's
    metrics are appended to, or a callable taking them.
    """
    _check_examples(examples, model.config.block_size)
    run = Run("sft", model, config, out_dir, resume, log, progress)
    data_rng = np.random.default_rng(config.seed)  # a stream of draws, its state carried in the checkpoint
    if "data_rng" in run.extra:
        data_rng.bit_generator.state = run.extra["data_rng"]
    xp = model.wte.weight.xp
    model.train()
    for step in run.steps():
        lr = run.lr
        picked = data_rng.choice(len(examples), min(config.batch_size * config.grad_accum, len(examples)),
                                 replace=False)
        batches = [sft_batch([examples[i] for i in rows], pad_id) for rows in np.array_split(picked, config.grad_accum)
                   if len(rows)]
        num_tokens = sum(float(mask.sum()) for _, _, mask in batches)
        loss_sum = 0.0
        for ids, targets, mask in batches:
            rows = run.split(len(ids))  # this rank's examples of the micro-batch (all of them in one process)
            loss = losses.sft_loss(model(xp.asarray(ids[rows])), targets[rows], mask[rows],
                                   num_tokens=num_tokens)
            loss.backward()
            loss_sum += float(loss.item())
        grad_norm = run.optimizer_step()
        run.end_step(step, {"loss": run.world.sum(loss_sum), "learning_rate": lr, "grad_norm": grad_norm, "num_tokens": num_tokens},
                     shown=("loss",), extra={"data_rng": data_rng.bit_generator.state})
    return run.history


def _check_examples(examples, block_size):
    if len(examples) == 0:
        raise ValueError("train_sft: examples is empty; expected (prompt_ids, response_ids) pairs")
    for i, example in enumerate(examples):
        if len(example) != 2:
            raise ValueError(f"train_sft: example {i} must be a (prompt_ids, response_ids) pair, got {example!r}")
        prompt, response = example
        if len(response) == 0:
            raise ValueError(f"train_sft: example {i} has an empty response; there is nothing to learn from it")
        if len(prompt) + len(response) - 1 > block_size:
            raise ValueError(f"train_sft: example {i} has {len(prompt)} + {len(response)} tokens; the model sees "
                             f"at most block_size + 1 = {block_size + 1}")
