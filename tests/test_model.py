import math

import numpy as np
import pytest

import minirlhf
import minirlhf.functional as F
from minirlhf import no_grad
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.padding import pad_batch

CFG = GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=64, block_size=32)


def tiny(value_head=False, seed=0, **overrides):
    minirlhf.manual_seed(seed)
    cfg = GPTConfig(**{**CFG.__dict__, **overrides})
    return GPT(cfg, value_head=value_head)


def left_padded(rng, B=3, T=10):
    ids = rng.integers(0, CFG.vocab_size, (B, T))
    mask = np.ones((B, T), dtype=np.float32)
    for i in range(B):
        mask[i, :i * 2] = 0
    return ids, mask


# ------------------------------------------------------------- architecture
def test_gpt2_init_scales_residual_projections(rng):
    model = tiny(n_embd=64, n_layer=4)
    params = dict(model.named_parameters())
    assert np.std(params["h.0.mlp.c_fc.weight"].data) == pytest.approx(0.02, rel=0.1)
    assert np.std(params["h.0.attn.c_proj.weight"].data) == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert np.std(params["h.3.mlp.c_proj.weight"].data) == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert np.all(params["h.0.attn.c_attn.bias"].data == 0)
    assert np.all(params["ln_f.weight"].data == 1)
    assert all(p.dtype == np.float32 for p in model.parameters())


def test_same_seed_gives_same_weights_and_another_seed_differs():
    a, b, c = tiny(seed=3), tiny(seed=3), tiny(seed=4)
    assert all(np.array_equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not np.array_equal(a.wte.weight.data, c.wte.weight.data)


def test_lm_head_is_tied_to_token_embedding(rng):
    model = tiny()
    assert "lm_head.weight" not in model.state_dict()
    ids = rng.integers(0, CFG.vocab_size, (2, 5))
    with no_grad():
        h = model.hidden(ids).data
        logits = model(ids).data
    np.testing.assert_allclose(logits, h @ model.wte.weight.data.T, rtol=1e-5, atol=1e-5)


def test_logits_are_causal(rng):
    model = tiny()
    ids = rng.integers(0, CFG.vocab_size, (1, 8))
    changed = ids.copy()
    changed[0, 5] = (ids[0, 5] + 1) % CFG.vocab_size
    with no_grad():
        a, b = model(ids).data, model(changed).data
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not np.allclose(a[:, 5:], b[:, 5:])


def test_left_padding_gives_the_logits_of_the_unpadded_row(rng):
    model = tiny()
    ids, mask = left_padded(rng)
    with no_grad():
        padded = model(ids, mask).data
        for i in range(len(ids)):
            real = mask[i] == 1
            alone = model(ids[i:i + 1, real]).data[0]
            np.testing.assert_allclose(padded[i, real], alone, atol=1e-5)


def test_attention_mask_none_equals_all_ones(rng):
    model = tiny()
    ids = rng.integers(0, CFG.vocab_size, (2, 7))
    with no_grad():
        np.testing.assert_allclose(model(ids).data, model(ids, np.ones((2, 7))).data, atol=1e-6)


# ----------------------------------------------------------------- KV cache
@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_token_by_token_equals_full_forward(rng, padded):
    model = tiny()
    ids, mask = left_padded(rng, B=3, T=12)
    if not padded:
        mask = np.ones_like(mask)
    with no_grad():
        full = model(ids, mask).data
        cache = model.new_cache()
        steps = [model(ids[:, t:t + 1], mask[:, :t + 1], cache=cache).data[:, 0] for t in range(12)]
    real = mask[..., None] == 1
    np.testing.assert_allclose(np.where(real, np.stack(steps, axis=1), 0), np.where(real, full, 0), atol=1e-5)
    assert cache.length == 12


def test_kv_cache_prompt_chunk_then_tokens_equals_full_forward(rng):
    model = tiny()
    ids, mask = left_padded(rng, B=3, T=20)
    with no_grad():
        full = model(ids, mask).data
        cache = model.new_cache()
        first = model(ids[:, :9], mask[:, :9], cache=cache).data
        rest = [model(ids[:, t:t + 1], mask[:, :t + 1], cache=cache).data[:, 0] for t in range(9, 20)]
    got = np.concatenate([first, np.stack(rest, axis=1)], axis=1)
    real = mask[..., None] == 1
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, full, 0), atol=1e-5)


def test_kv_cache_keeps_gradients_of_the_new_tokens(rng):
    model = tiny()
    ids = rng.integers(0, CFG.vocab_size, (2, 6))
    cache = model.new_cache()
    with no_grad():
        model(ids[:, :4], cache=cache)
    model(ids[:, 4:], cache=cache).sum().backward()
    assert model.wte.weight.grad is not None and np.abs(model.wte.weight.grad).sum() > 0


def test_kv_cache_refuses_more_than_block_size(rng):
    model = tiny()
    cache = model.new_cache()
    with no_grad():
        model(rng.integers(0, 64, (1, 30)), cache=cache)
        with pytest.raises(ValueError, match="block_size"):
            model(rng.integers(0, 64, (1, 3)), cache=cache)


# -------------------------------------------------------------------- heads
def test_value_head_gives_one_value_per_token(rng):
    model = tiny(value_head=True)
    ids, mask = left_padded(rng)
    logits, values = model(ids, mask, return_values=True)
    assert logits.shape == (3, 10, CFG.vocab_size) and values.shape == (3, 10)
    (values * mask).sum().backward()
    assert np.abs(model.value_head.weight.grad).sum() > 0


def test_value_gradient_stops_at_the_trunk(rng):
    """The critic's regression of noisy returns must not move the shared trunk (GPT.values reads h detached)."""
    model = tiny(value_head=True)
    ids, mask = left_padded(rng)
    _, values = model(ids, mask, return_values=True)
    (values * mask).sum().backward()
    assert np.abs(model.value_head.weight.grad).sum() > 0
    assert all(p.grad is None or not np.abs(p.grad).any() for n, p in model.named_parameters()
               if not n.startswith("value_head."))


def test_return_values_without_value_head_is_an_error(rng):
    with pytest.raises(ValueError, match="value_head=True"):
        tiny()(rng.integers(0, 64, (1, 4)), return_values=True)


def test_reward_is_read_at_last_real_token_with_left_or_right_padding(rng):
    rm = RewardModel(CFG)
    seqs = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    left, lmask = pad_batch(seqs, side="left")
    right, rmask = pad_batch(seqs, side="right")
    with no_grad():
        r_left, r_right = rm(left, lmask).data, rm(right, rmask).data
        alone = np.array([rm(np.array([s])).data[0] for s in seqs])
    assert r_left.shape == (3,)
    np.testing.assert_allclose(r_left, alone, atol=1e-5)
    np.testing.assert_allclose(r_right, alone, atol=1e-5)


def test_reward_ignores_tokens_after_the_last_real_one(rng):
    rm = RewardModel(CFG)
    ids, mask = pad_batch([[1, 2, 3], [4, 5]], side="right")
    other = ids.copy()
    other[1, 2] = 40  # a pad position
    with no_grad():
        np.testing.assert_allclose(rm(ids, mask).data, rm(other, mask).data)


def test_reward_is_the_sum_of_response_token_scores_plus_the_last_token_head(rng):
    minirlhf.manual_seed(3)
    rm = RewardModel(CFG)
    rm.to(np.float64)
    ids, mask = pad_batch([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]], side="right")
    response = np.zeros_like(mask)
    response[0, 3:6] = 1
    response[1, 2:4] = 1
    with no_grad():
        r = rm(ids, mask, response).data
        h = rm.transformer.hidden(ids, mask).data
    u, w, b = rm.token_scores.weight.data, rm.reward_head.weight.data, rm.reward_head.bias.data
    for i, (first, end) in enumerate([(3, 6), (2, 4)]):
        expected = sum(u[ids[i, t]] @ h[i, t - 1] for t in range(first, end)) + w @ h[i, end - 1] + b
        np.testing.assert_allclose(r[i], expected[0], rtol=1e-10)


def test_reward_model_rejects_a_response_mask_of_another_shape(rng):
    ids = rng.integers(0, 64, (2, 5))
    with pytest.raises(ValueError, match="response_mask must have the shape of ids"):
        RewardModel(CFG)(ids, np.ones((2, 5)), np.ones((2, 4)))


def test_reward_model_rejects_a_row_without_real_tokens(rng):
    mask = np.ones((2, 5))
    mask[1] = 0
    with pytest.raises(ValueError, match="at least one real token"):
        RewardModel(CFG)(rng.integers(0, 64, (2, 5)), mask)


def test_reward_model_from_gpt_copies_the_trunk(rng):
    gpt = tiny(value_head=True)
    rm = RewardModel.from_gpt(gpt)
    ids = rng.integers(0, 64, (2, 6))
    with no_grad():
        np.testing.assert_allclose(rm.transformer.hidden(ids).data, gpt.hidden(ids).data)
    rm.transformer.wte.weight.data += 1
    assert not np.allclose(rm.transformer.wte.weight.data, gpt.wte.weight.data)


def test_copy_is_independent_of_the_original(rng):
    model = tiny()
    ref = model.copy()
    ids = rng.integers(0, 64, (2, 6))
    with no_grad():
        np.testing.assert_array_equal(ref(ids).data, model(ids).data)
    model.wte.weight.data *= 2
    assert not np.allclose(ref.wte.weight.data, model.wte.weight.data)


# ------------------------------------------------------------------- errors
def test_ids_longer_than_block_size_is_an_error(rng):
    with pytest.raises(ValueError, match="block_size=32"):
        tiny()(rng.integers(0, 64, (1, 33)))


def test_ids_out_of_vocab_is_an_error():
    with pytest.raises(ValueError, match="vocab_size=64"):
        tiny()(np.array([[1, 64]]))
    with pytest.raises(ValueError, match="vocab_size=64"):
        tiny()(np.array([[-1, 2]]))


def test_mask_shape_mismatch_is_an_error(rng):
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        tiny()(rng.integers(0, 64, (2, 5)), np.ones((2, 4)))


def test_bad_config_is_an_error():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)


def test_pad_batch_pads_on_the_requested_side():
    ids, mask = pad_batch([[1, 2], [3]], pad_id=9, side="left")
    np.testing.assert_array_equal(ids, [[1, 2], [9, 3]])
    np.testing.assert_array_equal(mask, [[1, 1], [0, 1]])
    ids, mask = pad_batch([[1, 2], [3]], pad_id=9, side="right")
    np.testing.assert_array_equal(ids, [[1, 2], [3, 9]])
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], side="middle")


# ------------------------------------------------------------ device & HF
def test_forward_on_device_matches_numpy(device, rng):
    model = tiny()
    ids, mask = left_padded(rng)
    with no_grad():
        want = model(ids, mask).data
        model.to(device)
        got = model(ids, mask).data
    np.testing.assert_allclose(minirlhf.backend.to_numpy(got) * mask[..., None], want * mask[..., None], atol=1e-4)


def _hf_model(tmp_path, **overrides):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hc = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=64, n_positions=32,
                                 bos_token_id=None, eos_token_id=None, **overrides)
    hf = transformers.GPT2LMHeadModel(hc).eval()
    hf.save_pretrained(tmp_path)
    return torch, hf


def test_from_pretrained_matches_transformers_gpt2(tmp_path, rng):
    torch, hf = _hf_model(tmp_path)
    model = GPT.from_pretrained(tmp_path)
    ids, mask = left_padded(rng)
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(model(ids).data, want, atol=1e-4)
    # left padding: HF takes positions from position_ids, ours from the mask
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
    with torch.no_grad():
        want = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  position_ids=torch.from_numpy(positions)).logits.numpy()
    real = mask[..., None] == 1
    np.testing.assert_allclose(np.where(real, model(ids, mask).data, 0), np.where(real, want, 0), atol=1e-4)


def test_gradients_match_transformers_gpt2(tmp_path, rng):
    torch, hf = _hf_model(tmp_path)
    model = GPT.from_pretrained(tmp_path)
    ids = rng.integers(0, 64, (2, 9))
    loss = F.cross_entropy(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    tids = torch.from_numpy(ids)
    hf_loss = torch.nn.functional.cross_entropy(hf(tids[:, :-1]).logits.reshape(-1, 64), tids[:, 1:].reshape(-1))
    hf_loss.backward()
    assert loss.item() == pytest.approx(hf_loss.item(), abs=1e-5)
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        g = hf_params["transformer." + name].grad.numpy()
        g = g.T if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else g
        np.testing.assert_allclose(p.grad, g, atol=1e-5, err_msg=name)


def test_from_pretrained_names_an_unsupported_setting(tmp_path):
    _hf_model(tmp_path, activation_function="relu")
    with pytest.raises(ValueError, match="activation_function='relu'"):
        GPT.from_pretrained(tmp_path)


# ------------------------------------------------- the last positions alone
def _models_for_last():
    from minirlhf.llama import Llama, LlamaConfig
    minirlhf.manual_seed(4)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=11, block_size=16)).to(np.float64)
    minirlhf.manual_seed(4)
    qwen3 = Llama(LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=16, intermediate_size=24, vocab_size=11,
                              block_size=16, qk_norm=True, qkv_bias=True)).to(np.float64)
    return {"gpt": gpt, "llama (GQA, q/k norms)": qwen3}


@pytest.mark.parametrize("name", ["gpt", "llama (GQA, q/k norms)"])
def test_hidden_of_the_last_positions_equals_the_full_pass_and_its_gradient(name):
    """``hidden(..., last=n)`` skips the last block's other rows: the kept states, and the gradient of
    any function of them with respect to every weight, are the full pass's."""
    model = _models_for_last()[name]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 11, (3, 9))
    mask = np.ones((3, 9), dtype=np.int64)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    weight = rng.standard_normal((3, 9, 16))
    for n in (1, 4, 9):
        model.zero_grad()
        full = model.hidden(ids, mask)[:, 9 - n:]
        (full * weight[:, 9 - n:]).sum().backward()
        expected = {k: p.grad.copy() for k, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        kept = model.hidden(ids, mask, last=n)
        assert kept.shape == (3, n, 16)
        np.testing.assert_allclose(kept.data, full.data, rtol=1e-12, atol=1e-12)
        (kept * weight[:, 9 - n:]).sum().backward()
        got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        assert got.keys() == expected.keys()
        for k in expected:
            np.testing.assert_allclose(got[k], expected[k], rtol=1e-10, atol=1e-12, err_msg=f"{name} last={n}: {k}")


@pytest.mark.parametrize("name", ["gpt", "llama (GQA, q/k norms)"])
def test_a_prefill_that_keeps_only_its_last_state_writes_the_full_passs_cache(name):
    model = _models_for_last()[name]
    ids = np.random.default_rng(1).integers(0, 11, (2, 6))
    with no_grad():
        full_cache, kept_cache = model.new_cache(), model.new_cache()
        full = model.hidden(ids, cache=full_cache)
        kept = model.hidden(ids, cache=kept_cache, last=1)
        np.testing.assert_allclose(kept.data[:, 0], full.data[:, -1], rtol=1e-12, atol=1e-12)
        step = np.array([[3], [7]])
        np.testing.assert_allclose(model.hidden(step, cache=kept_cache).data, model.hidden(step, cache=full_cache).data,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("last", [0, 10, -1, 1.5, True, "2"])
def test_hidden_refuses_a_last_that_is_not_a_count_of_its_positions(last):
    for name, model in _models_for_last().items():
        with pytest.raises(ValueError, match=r"last must be None or an int in \[1, 9\]"):
            model.hidden(np.zeros((1, 9), dtype=np.int64), last=last)


def test_score_rollout_of_a_reward_model_equals_its_forward_on_prompt_and_response():
    from minirlhf.rollout import from_responses
    from minirlhf.train.reward import score_rollout
    minirlhf.manual_seed(2)
    rm = RewardModel(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=11, block_size=16)).to(np.float64)
    prompts = [[1, 2, 3], [4, 5], [1, 2, 3], [6]]
    rollout = from_responses(prompts, [[7, 8, 9], [10], [], [2, 2, 2, 2]], 0)  # rows 0 and 2 share a prompt
    ids = np.concatenate([rollout.prompt_ids, rollout.tokens], axis=1)
    mask = np.concatenate([rollout.prompt_mask, rollout.mask], axis=1)
    response = np.concatenate([np.zeros_like(rollout.prompt_mask), rollout.mask], axis=1)
    with no_grad():
        expected = rm(ids, mask, response).data
    np.testing.assert_allclose(score_rollout(rm, rollout), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(score_rollout(rm, rollout, rows=3), expected, rtol=1e-12, atol=1e-12)
