"""The jobs tests/test_distributed.py launches, as one process (``python -m data_parallel_job``), as
ranks (``mpiexec -n 2 python -m data_parallel_job``) or as replica threads of one process (``python -m
data_parallel_job JOB OUT --replicas 2``); rank 0 writes what the test compares.

    python -m data_parallel_job train OUT              every trainer at test size, float64 models:
                                                       OUT/<trainer>.npz (weights), OUT/<trainer>.json (metrics)
    python -m data_parallel_job gradient OUT           one summed gradient of a batch whose rows hold very
                                                       different token counts, and the mean of per-rank means
    python -m data_parallel_job resume OUT [--stop K]  PPO with a checkpoint every step; --stop K raises after step K
    python -m data_parallel_job fail OUT               rank 1's reward function raises at its first call
    python -m data_parallel_job few OUT                GRPO with one prompt per step
    python -m data_parallel_job nccl OUT               GPUs: the NCCL gradient sum equals MPI's sum on the host
"""
import json
import os
import sys

import numpy as np

import minirlhf
from minirlhf import losses
from minirlhf.distributed import replicas, world
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.rollout import from_responses, response_logprobs
from minirlhf.train.dpo import DPOConfig, train_dpo
from minirlhf.train.grpo import GRPOConfig, train_grpo
from minirlhf.train.ppo import PPOConfig, train_ppo, with_value_head
from minirlhf.train.reward import RewardConfig, train_reward_model
from minirlhf.train.rloo import RLOOConfig, train_rloo
from minirlhf.train.sft import SFTConfig, train_sft

EOS, PAD, GOOD = 11, 0, 5
PROMPTS = [[1, 2, 3], [2, 3], [3, 1, 4, 1], [4, 2], [1, 4], [2, 2, 3], [3, 3], [4, 1, 2]]


def float64(model):
    return model.to(np.float64)


def tiny_gpt(seed=0):
    minirlhf.manual_seed(seed)
    return float64(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=12, block_size=16)))


def tiny_reward_model():
    return float64(RewardModel.from_gpt(tiny_gpt(1)))


def first_token_is_good(index, responses):
    return [1.0 if r and r[0] == GOOD else 0.0 for r in responses]


def toy_pairs(n=24):
    """(prompt, chosen, rejected) triples of different lengths: the chosen answer starts with GOOD."""
    rng = np.random.default_rng(7)
    return [(PROMPTS[i % len(PROMPTS)], [GOOD] + [int(t) for t in rng.integers(1, 11, i % 4)] + [EOS],
             [6] + [int(t) for t in rng.integers(1, 11, (i + 2) % 5)] + [EOS]) for i in range(n)]


def trainers():
    """name → a function that trains a fresh model at test size and returns (model, metrics)."""
    pairs = toy_pairs()
    examples = [(p, c) for p, c, _ in pairs]

    def sft():
        model = tiny_gpt()
        return model, train_sft(model, examples, SFTConfig(steps=3, lr=1e-2, warmup=0, batch_size=5, grad_accum=2),
                                PAD, progress=False)

    def rm():
        model = tiny_reward_model()
        return model, train_reward_model(model, pairs, RewardConfig(steps=3, lr=1e-2, batch_size=5), PAD,
                                         progress=False)

    def dpo():
        model = tiny_gpt()
        return model, train_dpo(model, tiny_gpt(), pairs, DPOConfig(steps=3, lr=1e-2, batch_size=5), PAD,
                                progress=False)

    def grpo(loss_type):
        def train():
            model = tiny_gpt()
            cfg = GRPOConfig(steps=3, lr=1e-2, prompts_per_step=3, group_size=4, max_new_tokens=4, epochs=2,
                             loss_type=loss_type)
            return model, train_grpo(model, tiny_gpt(), PROMPTS, first_token_is_good, cfg, EOS, PAD, progress=False)
        return train

    def rloo():
        model = tiny_gpt()
        cfg = RLOOConfig(steps=3, lr=1e-2, prompts_per_step=3, group_size=3, max_new_tokens=4)
        return model, train_rloo(model, tiny_gpt(), PROMPTS, first_token_is_good, cfg, EOS, PAD, progress=False)

    def ppo(minibatches, samples_per_prompt=1):
        def train():
            model = with_value_head(tiny_gpt())
            float64(model)
            cfg = PPOConfig(steps=3, lr=1e-2, prompts_per_step=5, samples_per_prompt=samples_per_prompt, epochs=2,
                            minibatches=minibatches, max_new_tokens=4, adaptive_kl=True, kl_target=0.01,
                            kl_horizon=10)
            return model, train_ppo(model, tiny_gpt(), tiny_reward_model(), PROMPTS, cfg, EOS, PAD, progress=False)
        return train

    return {"sft": sft, "rm": rm, "dpo": dpo, "grpo": grpo("grpo"), "grpo_dapo": grpo("dapo"), "rloo": rloo,
            "ppo": ppo(2), "ppo_one_minibatch": ppo(1), "ppo_two_samples": ppo(2, samples_per_prompt=2)}


def save(out, name, model, history=None):
    if world().rank != 0:
        return
    np.savez(os.path.join(out, f"{name}.npz"), **{k: np.asarray(v) for k, v in model.state_dict().items()})
    if history is not None:
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(history, f)


def train_all(out):
    for name, train in trainers().items():
        save(out, name, *train())


def unequal_gradient(out):
    """Rank 0 holds one long response, rank 1 three short ones: the token-mean policy loss's summed
    gradient, and the gradient of the mean of the ranks' own means (the biased one)."""
    ranks = world()
    model = tiny_gpt()
    responses = [[1, 2, 3, 4, 5, 6, 7, 8, 9, EOS], [3, EOS], [4, EOS], [EOS]]
    batch = from_responses([PROMPTS[i] for i in range(4)], responses, PAD)
    rows = slice(0, 1) if ranks.rank == 0 else slice(1, 4)
    if ranks.size == 1:
        rows = slice(0, 4)
    mine = batch.rows(rows)
    advantages = np.linspace(-1, 1, 4)[rows]

    def gradient(weight):
        model.zero_grad()
        logp = response_logprobs(model, mine)
        loss, _ = losses.ppo_policy_loss(logp, logp.data, advantages, mine.mask)
        (loss * weight).backward()
        ranks.sum_gradients(model.parameters())
        return {name: np.asarray(p.grad) for name, p in model.named_parameters()}

    global_weight = gradient(float(mine.mask.sum()) / float(batch.mask.sum()))
    mean_of_means = gradient(1 / ranks.size)
    if ranks.rank == 0:
        np.savez(os.path.join(out, "gradient.npz"), **global_weight)
        np.savez(os.path.join(out, "mean_of_means.npz"), **mean_of_means)


def resume(out, stop=None):
    def log(metrics):
        if stop is not None and metrics["step"] == stop:
            raise RuntimeError(f"stopped after step {stop}")
    model = float64(with_value_head(tiny_gpt()))
    cfg = PPOConfig(steps=4, lr=1e-2, prompts_per_step=4, epochs=1, minibatches=1, max_new_tokens=4,
                    adaptive_kl=True, kl_target=0.01, kl_horizon=10, checkpoint_every=1)
    resuming = os.path.exists(os.path.join(out, "run", "checkpoint"))
    history = train_ppo(model, tiny_gpt(), tiny_reward_model(), PROMPTS, cfg, EOS, PAD,
                        out_dir=os.path.join(out, "run"), resume=resuming, log=log, progress=False)
    save(out, "resume", model, history)


def fail(out):
    def reward(index, responses):
        if world().rank == 1:
            raise ValueError("the reward server of rank 1 is down")
        return first_token_is_good(index, responses)
    cfg = GRPOConfig(steps=3, prompts_per_step=2, group_size=2, max_new_tokens=3)
    train_grpo(tiny_gpt(), tiny_gpt(), PROMPTS, reward, cfg, EOS, PAD, progress=False)


def few(out):
    cfg = GRPOConfig(steps=1, prompts_per_step=1, group_size=2, max_new_tokens=3)
    train_grpo(tiny_gpt(), tiny_gpt(), PROMPTS, first_token_is_good, cfg, EOS, PAD, progress=False)


def nccl(out):
    """Each rank's gradient on its own GPU, summed by NCCL, against the same gradients summed on the host."""
    from minirlhf.backend import to_numpy
    ranks = world()
    assert ranks.nccl is not None, "no NCCL communicator on a GPU machine"
    model = tiny_gpt().to("cuda")
    batch = from_responses([PROMPTS[ranks.rank]], [[1 + ranks.rank, 2, EOS]], PAD)
    response_logprobs(model, batch).sum().backward()
    local = {name: to_numpy(p.grad) for name, p in model.named_parameters()}
    ranks.sum_gradients(model.parameters())
    for name, p in model.named_parameters():
        np.testing.assert_allclose(to_numpy(p.grad), ranks.sum(local[name].astype(np.float64)), rtol=1e-10, atol=1e-12)
    if ranks.rank == 0:
        print("nccl ok")


def run(argv):
    job, out = argv[0], argv[1]
    if job == "train":
        train_all(out)
    elif job == "gradient":
        unequal_gradient(out)
    elif job == "resume":
        resume(out, int(argv[3]) if len(argv) > 3 else None)
    elif job in ("fail", "few", "nccl"):
        {"fail": fail, "few": few, "nccl": nccl}[job](out)
    else:
        raise SystemExit(f"data_parallel_job: unknown job {job!r}; expected train, gradient, resume, fail, few or nccl")


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--replicas" in argv:
        at = argv.index("--replicas")
        n = int(argv[at + 1])
        del argv[at:at + 2]
        replicas(n, run, argv)
    else:
        run(argv)
