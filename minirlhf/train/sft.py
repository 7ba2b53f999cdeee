"""Supervised fine-tuning: maximise log π(y | x) on (prompt x, response y) pairs.

    L_SFT = − (1 / Σ m) Σ_t m_t · log π(s_{t+1} | s_≤t),     s = x ⧺ y,  m_t = 1 iff s_{t+1} ∈ y

Only response tokens are predicted: the prompt is context, not a target (the first step of the
InstructGPT recipe, Ouyang et al. 2022). Each optimizer step averages ``grad_accum`` micro-batches,
clips the global gradient norm, and follows a linear warmup then cosine decay of the learning rate.
"""
import os
from dataclasses import asdict, dataclass

import numpy as np

from .. import functional as F
from ..checkpoint import load_checkpoint, save_checkpoint
from ..optim import AdamW, clip_grad_norm_, cosine_lr
from .common import MetricsLog, pad_prompt_response


@dataclass
class SFTConfig:
    lr: float = 3e-4
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    clip: float = 1.0              # max global gradient norm; 0 turns clipping off
    warmup: int = 10               # steps of linear warmup before the cosine decay
    min_lr: float = 0.0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    seed: int = 0                  # draws the micro-batches
    checkpoint_every: int = 0      # steps between checkpoints in out_dir (0: only at the end)
    pad_id: int = 0

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"SFTConfig: lr must be > 0, got {self.lr}")
        for name in ("steps", "batch_size", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SFTConfig: {name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"SFTConfig: {name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.clip < 0:
            raise ValueError(f"SFTConfig: clip must be >= 0 (0 = no clipping), got {self.clip}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"SFTConfig: min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        self.betas = tuple(self.betas)


def sft_batch(examples, pad_id=0):
    """Right-padded inputs, next-token targets and the response mask for a list of (prompt, response) pairs.

    Returns ids (B, T), targets (B, T) with targets[:, t] = s_{t+1}, and loss_mask (B, T)
    with 1 exactly where targets[:, t] is a response token.
    """
    ids, _, is_response = pad_prompt_response(examples, pad_id)
    return ids[:, :-1], ids[:, 1:], is_response[:, 1:]


def sft_loss(model, ids, targets, loss_mask):
    """Mean −log π of the response tokens (right padding needs no attention mask: pads come last)."""
    logits = model(ids)  # (B, T, V)
    return F.cross_entropy(logits, targets, mask=loss_mask)


def train_sft(model, examples, config, out_dir=None, resume=False, log=None):
    """Fine-tune ``model`` on ``examples`` (a list of (prompt_ids, response_ids)); returns per-step metrics.

    ``out_dir``: checkpoints go to ``out_dir/checkpoint`` every ``checkpoint_every`` steps and at the
    end; ``resume=True`` continues from there exactly (weights, AdamW buffers, step, data order, RNG).
    ``log``: a JSONL path that each step's metrics are appended to, or a callable taking them.
    """
    _check_examples(examples, model.config.block_size)
    if resume and out_dir is None:
        raise ValueError("train_sft: resume=True needs out_dir (where the checkpoint is)")
    ckpt_dir = os.path.join(out_dir, "checkpoint") if out_dir is not None else None
    optimizer = AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    data_rng = np.random.default_rng(config.seed)
    start = 0
    if resume:
        start, extra = load_checkpoint(ckpt_dir, model, optimizer)
        data_rng.bit_generator.state = extra["data_rng"]
    write = MetricsLog(log, start)
    xp = model.wte.weight.xp
    model.train()
    history = []
    for step in range(start, config.steps):
        lr = cosine_lr(step, config.lr, config.warmup, config.steps, config.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for _ in range(config.grad_accum):
            picked = data_rng.choice(len(examples), size=min(config.batch_size, len(examples)), replace=False)
            ids, targets, loss_mask = (xp.asarray(a) for a in sft_batch([examples[i] for i in picked], config.pad_id))
            loss = sft_loss(model, ids, targets, loss_mask) / config.grad_accum
            loss.backward()
            loss_sum += float(loss.item())
        grad_norm = clip_grad_norm_(model.parameters(), config.clip) if config.clip else 0.0
        optimizer.step()
        optimizer.zero_grad()
        metrics = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": float(grad_norm)}
        history.append(metrics)
        write(metrics)
        if ckpt_dir is not None and (step + 1 == config.steps or
                                     (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0)):
            save_checkpoint(ckpt_dir, model, optimizer, step + 1,
                            extra={"data_rng": data_rng.bit_generator.state, "config": asdict(config)})
    return history


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
