"""The GPU path end to end without a GPU: a strict stand-in of CuPy (tests/cuda_cpu/strict_cupy.py)
plays the GPU, with the .cu kernels run by the CPU execution harness.

On "cuda" at test size, generation with the KV cache, a GRPO step, a DPO step and a checkpoint
round trip give the NumPy path's results; the copies from the device to the host per training
step are counted by the function that makes them, and no array of the GPU path is ever converted
to NumPy implicitly (the stand-in raises where CuPy would).
"""
import os
import sys

import numpy as np
import pytest

import minirlhf
from minirlhf import backend, kernels
from minirlhf.checkpoint import load_checkpoint, save_checkpoint
from minirlhf.kernels import attention, reference
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.optim import AdamW
from minirlhf.sampling import generate
from minirlhf.tensor import Tensor, no_grad
from minirlhf.train.dpo import DPOConfig, train_dpo
from minirlhf.train.grpo import GRPOConfig, train_grpo
from minirlhf.train.ppo import PPOConfig, train_ppo, with_value_head
from minirlhf.train.reward import RewardConfig, train_reward_model
from minirlhf.train.rloo import RLOOConfig, train_rloo
from minirlhf.train.sft import SFTConfig, train_sft

from cuda_cpu import build, strict_cupy

EOS, PAD, GOOD = 11, 0, 5
PROMPTS = [[1, 2, 3], [2, 3], [3, 1, 4, 1], [4, 2]]
PAIRS = [([1, 2, 3], [5, 11], [6, 11]), ([2, 3], [5, 5, 11], [6, 11]), ([3, 1, 4, 1], [5, 11], [6, 6, 11]),
         ([4, 2], [5, 11], [6, 11])]


@pytest.fixture
def cp(monkeypatch):
    """The strict CuPy stand-in as ``cupy`` for this test (everything it replaced is restored after)."""
    if build.compiler() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no C++ compiler: CI must run the GPU path through the CPU execution harness")
        pytest.skip("needs a C++ compiler (g++) for the CPU execution harness")
    return strict_cupy.install(monkeypatch)


def tiny_gpt(device, seed=0, n_embd=64, block_size=32):
    """Two heads of 32 dimensions: the fused kernels' smallest head size."""
    minirlhf.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=n_embd, vocab_size=12, block_size=block_size))
    model.to(device)
    return model


def weights(model):
    return {name: backend.to_numpy(value) for name, value in model.state_dict().items()}


def assert_same_weights(got, want, atol):
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol, err_msg=name)


def assert_same_metrics(got, want, rtol):
    for step_got, step_want in zip(got, want, strict=True):
        assert step_got.keys() == step_want.keys()
        for name in step_want:
            assert step_got[name] == pytest.approx(step_want[name], rel=rtol, abs=1e-6), name


def first_token_is_good(index, responses):
    return [1.0 if r and r[0] == GOOD else 0.0 for r in responses]


def copies_per_step(cp, train):
    """What ``train(log)`` returns, and {site: device-to-host copies} of each of its steps (from the counts at
    each logged step)."""
    cp.counts.reset()
    marks = []
    result = train(lambda record: marks.append(len(cp.counts.device_to_host)))
    return result, [cp.counts.by_site(cp.counts.device_to_host[start:end]) for start, end in zip([0] + marks, marks)]


# ------------------------------------------------------------ the stand-in is strict
def test_the_stand_in_refuses_implicit_conversion_and_host_operands_as_cupy_does(cp):
    x = cp.arange(6, dtype=cp.float32).reshape(2, 3)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(x)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.array([x[0], x[1]])
    with pytest.raises(TypeError, match="Unsupported type"):
        x + np.ones(3, dtype=np.float32)
    with pytest.raises(TypeError, match="Unsupported type"):
        np.ones(3, dtype=np.float32) * x
    with pytest.raises(TypeError, match="Unsupported type"):
        cp.concatenate([x, np.ones((1, 3), dtype=np.float32)])
    with pytest.raises(TypeError):
        np.linalg.norm(x)  # a NumPy function the stand-in does not provide is refused, never run on the host
    assert not isinstance(x, np.ndarray) and backend.is_cupy_array(x)
    assert isinstance(np.exp(x), cp.ndarray) and isinstance(np.concatenate([x, x]), cp.ndarray)
    assert isinstance(x.sum(), cp.ndarray) and x.sum().ndim == 0  # a reduction stays on the device
    assert cp.counts.device_to_host == []
    y = cp.zeros_like(x)
    assert np.multiply(x, 2, out=y) is y and cp.add(x, y, out=y) is y and y.get().tolist() == [[0, 3, 6], [9, 12, 15]]


def test_every_way_back_to_the_host_is_counted_with_the_function_that_asked(cp):
    x = cp.arange(4, dtype=cp.float32)

    def read_back():
        np.testing.assert_array_equal(x.get(), np.arange(4))
        np.testing.assert_array_equal(cp.asnumpy(x), np.arange(4))
        assert float(x.sum()) == 6 and int(x[1]) == 1 and bool(x[1]) and x[2].item() == 2
        assert x.tolist() == [0, 1, 2, 3] and f"{x[3]:.0f}" == "3"
        assert x[x > 1].shape == (2,)  # the size of a masked selection is read back
    read_back()
    assert cp.counts.by_site(cp.counts.device_to_host) == {f"{__name__}.read_back": 9}


def test_installing_the_stand_in_sets_aside_what_minirlhf_cached_of_cupy_and_puts_it_back():
    def cached():
        return (backend._cupy, backend._cupy_checked, backend._generators, kernels._modules, kernels._kernels,
                attention._shared_memory_limit, sys.modules.get("cupy"), sys.modules.get("cupyx"))
    before = cached()
    with pytest.MonkeyPatch.context() as monkeypatch:
        cp = strict_cupy.install(monkeypatch)
        assert backend.cupy_or_none() is cp and backend.xp_for("cuda") is cp
        generator = backend.generator("cuda")
        assert isinstance(generator.random(2), cp.ndarray)
    assert all(now is then for now, then in zip(cached(), before))
    assert backend._generators.get("cuda") is not generator


# ------------------------------------------------------------ the GPU path gives the NumPy path's results
@pytest.mark.parametrize("top_k, top_p", [(None, None), (4, 0.9)])
def test_generation_with_the_kv_cache_on_cuda_gives_the_numpy_tokens_and_logprobs(cp, top_k, top_p):
    prompts = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4], [3, 1, 4] * 6]  # 16 and 18 tokens: fused prefill
    out = {}
    for device in ("cpu", "cuda"):
        model = tiny_gpt(device)
        cp.counts.reset()
        g = generate(model, prompts, max_new_tokens=10, temperature=1.0, top_k=top_k, top_p=top_p, eos_id=EOS,
                     pad_id=PAD, seed=[3, 4])
        copies = cp.counts.by_site(cp.counts.device_to_host)
        out[device] = [backend.to_numpy(a) for a in (g.tokens, g.mask, g.logprobs)]
        assert backend.device_of(g.tokens) == device
    np.testing.assert_array_equal(out["cuda"][0], out["cpu"][0])
    np.testing.assert_array_equal(out["cuda"][1], out["cpu"][1])
    np.testing.assert_allclose(out["cuda"][2], out["cpu"][2], rtol=0, atol=1e-5)
    # the eos check every 8 steps (once: step 8) and the number of steps taken
    assert copies == {"minirlhf.sampling.generate": 2}


def test_generation_from_a_padded_device_batch_and_its_device_mask_equals_generation_from_the_lists(cp):
    prompts = [[1, 2, 3], [4, 2]]
    ids, mask = np.array([[1, 2, 3], [PAD, 4, 2]]), np.array([[1, 1, 1], [0, 1, 1]], dtype=np.float32)
    model = tiny_gpt("cuda")
    from_lists = generate(model, prompts, max_new_tokens=4, eos_id=EOS, pad_id=PAD, seed=1)
    from_arrays = generate(model, cp.asarray(ids), max_new_tokens=4, eos_id=EOS, pad_id=PAD, seed=1,
                           attention_mask=cp.asarray(mask))
    for a, b in zip((from_lists.tokens, from_lists.logprobs), (from_arrays.tokens, from_arrays.logprobs)):
        np.testing.assert_array_equal(a.get(), b.get())


# Copies from the device to the host in one GRPO step, by the function that makes them (none in the losses):
GRPO_STEP_COPIES = {
    "minirlhf.sampling.generate": 1,           # how many steps the longest response took (the rollout's width)
    "minirlhf.rollout.responses": 2,           # tokens and mask: the rule reward reads the responses on the host
    "minirlhf.train.metrics.rollout_metrics": 1,  # the response lengths, for their mean, min and max
    "minirlhf.train.grpo.train_grpo": 3,       # the step's token count (weighs its token means), entropy, kl
    "minirlhf.train.run.optimizer_step": 2,    # the loss and the gradient norm, for the log
    "minirlhf.train.metrics.clip_metrics": 3,  # the three clip fractions
    "minirlhf.train.metrics.kl_metrics": 1,    # objective/kl
}


def test_a_grpo_step_on_cuda_gives_the_numpy_step_with_13_copies_to_the_host(cp):
    config = GRPOConfig(steps=2, lr=1e-2, prompts_per_step=2, group_size=4, max_new_tokens=3, beta=0.04)
    history, copies, trained = {}, {}, {}
    for device in ("cpu", "cuda"):
        policy, reference = tiny_gpt(device), tiny_gpt(device)
        history[device], copies[device] = copies_per_step(cp, lambda log: train_grpo(
            policy, reference, PROMPTS, first_token_is_good, config, EOS, PAD, log=log, progress=False))
        trained[device] = weights(policy)
    assert_same_metrics(history["cuda"], history["cpu"], rtol=1e-4)
    assert_same_weights(trained["cuda"], trained["cpu"], atol=1e-4)
    assert copies["cpu"] == [{}, {}]
    assert copies["cuda"][1] == GRPO_STEP_COPIES and sum(GRPO_STEP_COPIES.values()) == 13


# Copies from the device to the host in one DPO step (none in the losses):
DPO_STEP_COPIES = {
    "minirlhf.train.run.optimizer_step": 2,    # the loss and the gradient norm, for the log
    "minirlhf.train.dpo.train_dpo": 6,         # rewards/chosen, rejected, margins, accuracies; logps/chosen, rejected
}


def test_a_dpo_step_on_cuda_gives_the_numpy_step_with_8_copies_to_the_host(cp):
    config = DPOConfig(steps=2, lr=1e-2, batch_size=4, beta=0.5)
    history, copies, trained = {}, {}, {}
    for device in ("cpu", "cuda"):
        policy, reference = tiny_gpt(device), tiny_gpt(device)
        history[device], copies[device] = copies_per_step(cp, lambda log: train_dpo(
            policy, reference, PAIRS, config, PAD, log=log, progress=False))
        trained[device] = weights(policy)
    assert_same_metrics(history["cuda"], history["cpu"], rtol=1e-4)
    assert_same_weights(trained["cuda"], trained["cpu"], atol=1e-4)
    assert copies["cpu"] == [{}, {}] and copies["cuda"][1] == DPO_STEP_COPIES


class FirstTokenRewardModel:
    """A reward model on the rollout's device: +1 where the first response token (column 3) is GOOD."""

    def __call__(self, ids, mask, response):
        return Tensor((ids[:, 3] == GOOD).astype(np.float32))


def other_trainer(name, device):
    """Two steps of one more trainer on ``device``: (its history, its trained model)."""
    pairs = [(p, [GOOD, 7, EOS], [GOOD + 1, 7, EOS]) for p in PROMPTS * 2]
    if name == "sft":
        model = tiny_gpt(device)
        return train_sft(model, [(p, [GOOD, EOS]) for p in PROMPTS], SFTConfig(steps=2, lr=1e-2, batch_size=2), PAD,
                         progress=False), model
    if name == "reward":
        model = RewardModel.from_gpt(tiny_gpt("cpu")).to(device)
        return train_reward_model(model, pairs, RewardConfig(steps=2, lr=1e-2, batch_size=4), PAD,
                                  progress=False), model
    if name == "rloo":
        model = tiny_gpt(device)
        config = RLOOConfig(steps=2, lr=1e-2, prompts_per_step=2, group_size=2, max_new_tokens=3)
        return train_rloo(model, tiny_gpt(device), PROMPTS, first_token_is_good, config, EOS, PAD,
                          progress=False), model
    model = with_value_head(tiny_gpt("cpu")).to(device)
    # four AdamW steps: where a gradient is near 0 its rounding moves the step by up to lr, so lr is small
    config = PPOConfig(steps=2, lr=1e-3, prompts_per_step=4, epochs=2, minibatches=2, max_new_tokens=3)
    return train_ppo(model, tiny_gpt(device), FirstTokenRewardModel(), [PROMPTS[0]] * 4, config, EOS, PAD,
                     progress=False), model


@pytest.mark.parametrize("name", ["sft", "reward", "rloo", "ppo"])
def test_every_other_trainer_on_cuda_gives_the_numpy_steps(cp, name):
    (history, model), (cuda_history, cuda_model) = other_trainer(name, "cpu"), other_trainer(name, "cuda")
    assert_same_metrics(cuda_history, history, rtol=1e-4)
    assert_same_weights(weights(cuda_model), weights(model), atol=1e-4)


def test_ppos_own_copies_to_the_host_do_not_grow_with_its_minibatches(cp):
    def ppo_copies(minibatches):
        config = PPOConfig(steps=2, lr=1e-3, prompts_per_step=4, epochs=2, minibatches=minibatches, max_new_tokens=3)
        policy = with_value_head(tiny_gpt("cpu")).to("cuda")
        _, copies = copies_per_step(cp, lambda log: train_ppo(policy, tiny_gpt("cuda"), FirstTokenRewardModel(),
                                                              [PROMPTS[0]] * 4, config, EOS, PAD, log=log,
                                                              progress=False))
        return copies[1]["minirlhf.train.ppo.train_ppo"]
    # the token counts once per step (every count the log needs comes from them); the last minibatch's
    # losses and the entropy, for the log
    assert ppo_copies(1) == ppo_copies(4) == 4


def test_a_checkpoint_saved_from_gpu_tensors_loads_to_the_same_weights_and_adam_state(cp, tmp_path):
    model = tiny_gpt("cuda")
    optimizer = AdamW(model.parameters(), lr=1e-2)
    ids = cp.asarray(np.array([[1, 2, 3, 4]]))
    model(ids).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "ckpt", model, optimizer, step=1)
    for device in ("cpu", "cuda"):
        loaded = tiny_gpt(device, seed=1)
        loaded_optimizer = AdamW(loaded.parameters(), lr=1e-2)
        assert load_checkpoint(tmp_path / "ckpt", loaded, loaded_optimizer) == (1, {})
        assert_same_weights(weights(loaded), weights(model), atol=0)
        for p, q in zip(model.parameters(), loaded.parameters()):
            assert q.device == device
            for buffer in ("m", "v"):
                np.testing.assert_array_equal(backend.to_numpy(loaded_optimizer.state[id(q)][buffer]),
                                              backend.to_numpy(optimizer.state[id(p)][buffer]))
        with no_grad():
            np.testing.assert_array_equal(loaded(np.array([[1, 2, 3, 4]])).numpy(), model(ids).numpy())


# ------------------------------------------------------------ the KV cache is read in place
def test_a_block_of_queries_after_the_kv_cache_reads_the_cache_in_place_and_gives_the_full_forward(cp):
    B, T0, T1 = 2, 32, 16
    ids = np.random.default_rng(0).integers(0, 12, (B, T0 + T1))
    model = tiny_gpt("cpu", block_size=64)
    with no_grad():
        want = model(ids).numpy()
        model.to("cuda")
        cache = model.new_cache()
        first = model(ids[:, :T0], cache=cache)
        cp.counts.reset()
        second = model(ids[:, T0:], cache=cache)
    assert cache.keys[0].shape[2] == 64  # the buffer holds 64 positions, the attention reads its first 48
    np.testing.assert_allclose(np.concatenate([first.numpy(), second.numpy()], axis=1), want, rtol=0, atol=1e-5)
    launches = [(n, site) for n, site in cp.counts.allocations if site.startswith("minirlhf.kernels.attention")]
    H, D = 2, 32
    # q's rows (the new queries, permuted out of the projection), out and lse; nothing of the cache's size
    assert sorted(launches) == sorted([(B * H * T1 * D * 4, "minirlhf.kernels.attention._as_rows"),
                                       (B * H * T1 * D * 4, "minirlhf.kernels.attention.forward"),
                                       (B * H * T1 * 4, "minirlhf.kernels.attention.forward")])


def test_head_stride_reads_views_with_evenly_spaced_heads_in_place_and_nothing_else(cp):
    buffer = cp.zeros((2, 3, 64, 32), dtype=cp.float32)
    assert attention.head_stride(buffer[:, :, :40]) == 64 * 32      # a KV-cache slice
    assert attention.head_stride(buffer) == 64 * 32                 # contiguous
    assert attention.head_stride(buffer[:1, 1:2, :40]) == 40 * 32   # one head: any stride
    assert attention.head_stride(buffer[:, :2, :40]) is None        # heads of two batches 64·32·3 apart, not 2·…
    assert attention.head_stride(buffer[:, :, :40, :16]) is None    # rows not contiguous
    assert attention.head_stride(buffer.astype(cp.float64)) is None
    assert attention.head_stride(buffer[:, :, 1:41]) is not None    # 1 row in: 128 bytes, still aligned


@pytest.mark.parametrize("tensor_cores", [False, True], ids=["simt", "tf32x3"])
def test_the_fused_forward_of_a_cache_slice_equals_it_on_a_contiguous_copy_bit_for_bit(cp, tensor_cores):
    rng = np.random.default_rng(5)
    B, H, T, S, capacity, D = 1, 2, 16, 70, 128, 32  # two key tiles, the second partial
    q = rng.standard_normal((B, H, T, D)).astype(np.float32)
    k_buffer, v_buffer = (rng.standard_normal((B, H, capacity, D)).astype(np.float32) for _ in range(2))
    contiguous = attention.forward(cp.asarray(q), cp.asarray(k_buffer[:, :, :S].copy()),
                                   cp.asarray(v_buffer[:, :, :S].copy()), is_causal=True, tensor_cores=tensor_cores)
    in_place = attention.forward(cp.asarray(q), cp.asarray(k_buffer)[:, :, :S], cp.asarray(v_buffer[:, :, :S].copy()),
                                 is_causal=True, tensor_cores=tensor_cores)
    for got, want in zip(in_place, contiguous):
        np.testing.assert_array_equal(got.get(), want.get())
    want_out, _ = reference.attention_forward(q, k_buffer[:, :, :S], v_buffer[:, :, :S], None, True)
    np.testing.assert_allclose(in_place[0].get(), want_out, rtol=0, atol=1e-5)
