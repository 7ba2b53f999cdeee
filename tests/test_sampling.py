import numpy as np
import pytest

import minirlhf
from minirlhf import backend, is_grad_enabled, no_grad
from minirlhf.model import GPT, GPTConfig
from minirlhf.sampling import _filter, _sample, generate

CFG = GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=64, block_size=32)
PROMPTS = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]


@pytest.fixture
def model():
    minirlhf.manual_seed(0)
    return GPT(CFG)


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def full_forward_logits(model, out):
    """Logits of the policy for each generated token, from one forward over prompt + generation."""
    ids = np.concatenate([out.prompt_ids, out.tokens], axis=1)
    mask = np.concatenate([out.prompt_mask, out.mask], axis=1)
    T = out.prompt_ids.shape[1]
    with no_grad():
        return model(ids, mask).data[:, T - 1:-1]  # position t predicts token t + 1


def test_greedy_equals_argmax_decoding_without_cache(model):
    out = generate(model, PROMPTS, 8, temperature=0)
    for i, p in enumerate(PROMPTS):
        ids = list(p)
        with no_grad():
            for _ in range(8):
                ids.append(int(model(np.array([ids])).data[0, -1].argmax()))
        assert out.tokens[i].tolist() == ids[len(p):]


def test_prompts_are_left_padded(model):
    out = generate(model, PROMPTS, 2, temperature=0, pad_id=0)
    np.testing.assert_array_equal(out.prompt_ids, [[1, 2, 3, 4], [0, 0, 5, 6], [0, 7, 8, 9]])
    np.testing.assert_array_equal(out.prompt_mask, [[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])


def test_array_prompts_with_mask_equal_list_prompts(model):
    a = generate(model, PROMPTS, 6, seed=3)
    b = generate(model, a.prompt_ids, 6, seed=3, attention_mask=a.prompt_mask)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_same_seed_same_output_and_another_seed_differs(model):
    a = generate(model, PROMPTS, 10, seed=1)
    b = generate(model, PROMPTS, 10, seed=1)
    c = generate(model, PROMPTS, 10, seed=2)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_are_the_policy_at_the_temperature(model, temperature):
    out = generate(model, PROMPTS, 10, temperature=temperature, top_k=8, seed=0)
    logits = full_forward_logits(model, out)
    want = np.take_along_axis(log_softmax(logits / temperature), out.tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(out.logprobs, want * out.mask, atol=1e-4)


def test_greedy_logprobs_are_at_temperature_one(model):
    out = generate(model, PROMPTS, 5, temperature=0)
    logits = full_forward_logits(model, out)
    want = np.take_along_axis(log_softmax(logits), out.tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(out.logprobs, want, atol=1e-4)


def test_rows_stop_at_eos_independently(model):
    first = generate(model, PROMPTS, 12, temperature=0)
    eos = int(first.tokens[1, 2])  # the token row 1 makes at step 2
    out = generate(model, PROMPTS, 12, temperature=0, eos_id=eos, pad_id=63)
    for i in range(3):
        row = out.tokens[i].tolist()
        n = row.index(eos) + 1 if eos in row else len(row)
        assert out.mask[i, :n].tolist() == [1] * n and not out.mask[i, n:].any()
        assert all(tok == 63 for tok in row[n:])
        assert not out.logprobs[i, n:].any()
        assert row[:n] == first.tokens[i, :n].tolist()  # stopping one row does not disturb the others
    assert out.mask[1].sum() <= 3


def test_loop_stops_once_every_row_is_done(model):
    first = generate(model, [[1, 2, 3]], 12, temperature=0)
    eos = int(first.tokens[0, 1])
    out = generate(model, [[1, 2, 3]], 12, temperature=0, eos_id=eos)
    n = first.tokens[0].tolist().index(eos) + 1
    assert out.tokens.shape == (1, n)


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, PROMPTS, 8, temperature=0)
    np.testing.assert_array_equal(generate(model, PROMPTS, 8, top_k=1, seed=5).tokens, greedy.tokens)
    np.testing.assert_array_equal(generate(model, PROMPTS, 8, top_p=1e-6, seed=5).tokens, greedy.tokens)


def test_top_k_keeps_the_k_largest():
    z = np.array([[0.1, 3.0, -1.0, 2.0, 0.5]], dtype=np.float32)
    kept = np.isfinite(_filter(z, 2, None, np))
    np.testing.assert_array_equal(kept, [[False, True, False, True, False]])


def test_top_p_keeps_the_smallest_set_reaching_p():
    z = np.log(np.array([[0.15, 0.5, 0.05, 0.3]], dtype=np.float32))
    assert np.isfinite(_filter(z, None, 0.5, np)).sum() == 1
    assert np.isfinite(_filter(z, None, 0.79, np)).sum() == 2
    assert np.isfinite(_filter(z, None, 0.81, np)).sum() == 3
    assert np.isfinite(_filter(z, None, 1.0, np)).sum() == 4
    # top-p acts on what top-k left, renormalised: of {0.5, 0.3}, 0.5/0.8 < 0.7 needs both
    assert np.isfinite(_filter(z, 2, 0.7, np)).sum() == 2


def test_samples_follow_the_softmax():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    rows = np.tile(logits, (40000, 1))
    y, _ = _sample(rows, 1.0, None, None, np.random.default_rng(0), np)
    freq = np.bincount(y, minlength=4) / len(y)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.01)
    y, _ = _sample(rows, 1.0, None, 0.7, np.random.default_rng(0), np)
    np.testing.assert_allclose(np.bincount(y, minlength=4) / len(y), [0.625, 0.375, 0, 0], atol=0.01)


def test_generate_builds_no_graph_and_restores_train_mode(model):
    model.train()
    out = generate(model, PROMPTS, 3)
    assert model.training and is_grad_enabled()
    assert isinstance(out.logprobs, np.ndarray)
    assert all(p.grad is None for p in model.parameters())


def test_errors_name_the_argument(model):
    with pytest.raises(ValueError, match="block_size=32"):
        generate(model, PROMPTS, 30)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, PROMPTS, 3, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, PROMPTS, 3, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, PROMPTS, 3, top_k=0)
    with pytest.raises(ValueError, match="pad_id"):
        generate(model, PROMPTS, 3, pad_id=-100)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 3)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            generate(model, PROMPTS, 3, temperature=bad)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, PROMPTS, 3, top_p=float("nan"))


def test_a_right_padded_prompt_batch_is_refused():
    """Right padding would have a row continue after its pads (the sampler appends at the last column)."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=12, block_size=16))
    ids = np.array([[1, 2, 3], [4, 5, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, 2, attention_mask=np.array([[1, 1, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match="at least one real token"):
        generate(model, ids, 2, attention_mask=np.array([[1, 1, 1], [0, 0, 0]]))
    out = generate(model, np.array([[1, 2, 3], [0, 4, 5]]), 2, attention_mask=np.array([[1, 1, 1], [0, 1, 1]]))
    assert out.tokens.shape == (2, 2)


def test_generate_on_device_matches_numpy(model, device):
    want = generate(model, PROMPTS, 6, temperature=0)
    model.to(device)
    got = generate(model, PROMPTS, 6, temperature=0)
    assert backend.device_of(got.tokens) == device
    np.testing.assert_array_equal(backend.to_numpy(got.tokens), want.tokens)
    np.testing.assert_allclose(backend.to_numpy(got.logprobs), want.logprobs, atol=1e-4)


def test_sampler_logprobs_stay_exact_at_huge_logits():
    """(z_y − m) − log s, not z_y − (m + log s): at 1e30 the second loses the answer entirely."""
    z = np.array([[1e30, 1e30, -1e30, 0.0]])
    np.testing.assert_allclose(_sample(z, 0, None, None, None, np)[1], [-np.log(2)], rtol=1e-6)
    z32 = np.array([[-1e4, -1e4, -1e4, -9999]], dtype=np.float32)
    got = _sample(z32, 1.0, None, None, np.random.default_rng(0), np)
    z64 = z32.astype(np.float64)
    want = z64[0, got[0]] - (np.log(np.exp(z64 + 1e4).sum()) - 1e4)
    np.testing.assert_allclose(got[1], want, rtol=1e-6)


def test_a_batch_run_in_blocks_of_rows_samples_what_one_forward_samples(model, monkeypatch):
    prompts = PROMPTS * 3
    whole = generate(model, prompts, 8, seed=4, eos_id=7)
    monkeypatch.setattr(minirlhf.sampling, "ROWS_PER_FORWARD", 2)  # 9 rows: blocks of 2, 2, 2, 2, 1
    blocks = generate(model, prompts, 8, seed=4, eos_id=7)
    np.testing.assert_array_equal(blocks.tokens, whole.tokens)
    np.testing.assert_array_equal(blocks.mask, whole.mask)
    np.testing.assert_allclose(blocks.logprobs, whole.logprobs, rtol=1e-5, atol=1e-6)


def test_repeated_prompts_sample_what_each_prompt_alone_samples(model):
    """The prompt pass runs once per distinct prompt and is copied to its repeats; with a seed per row
    every row must still sample what it samples alone."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    seeds = [11, 12, 13, 14, 15, 16]
    batch = generate(model, prompts, 8, seed=seeds, eos_id=7)
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        alone = generate(model, [p], 8, seed=[s], eos_id=7)
        n = alone.tokens.shape[1]
        np.testing.assert_array_equal(batch.tokens[i, :n], alone.tokens[0])
        np.testing.assert_array_equal(batch.mask[i, :n], alone.mask[0])
        np.testing.assert_allclose(batch.logprobs[i, :n], alone.logprobs[0], rtol=1e-4, atol=1e-5)
