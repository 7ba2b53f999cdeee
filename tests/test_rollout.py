"""Rollouts: log π of sampled responses is what the sampler drew from, whatever the padding or the batch."""
import numpy as np
import pytest

import minirlhf
import minirlhf.functional as F
from minirlhf.model import GPT, GPTConfig, PrefixCache
from minirlhf.rollout import Rollout, from_responses, response_hidden, response_logprobs, sample, sequence_logprobs
from minirlhf.tensor import no_grad

EOS, PAD = 11, 0
PROMPTS = [[1, 2, 3], [2, 3], [3, 1, 4, 1], [4, 2], [1, 4, 9, 9, 9]]
RESPONSES = [[5, 7, EOS], [6, EOS], [5, 5, 5, 5, EOS], [EOS], [7, 8]]


def tiny_gpt(seed=0):
    minirlhf.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=12, block_size=16))


def test_logprobs_do_not_depend_on_how_much_padding_a_row_gets():
    """A response's log-probs are the same alone, beside longer prompts (more left padding) and beside
    longer responses (more right padding): padding must be masked out of attention and positions
    (OpenRLHF #217 and TRL #1136 are of this class: position ids that count the pads)."""
    model = tiny_gpt()
    with no_grad():
        together = response_logprobs(model, from_responses(PROMPTS, RESPONSES, PAD)).data
        for i, (p, y) in enumerate(zip(PROMPTS, RESPONSES)):
            alone = response_logprobs(model, from_responses([p], [y], PAD)).data
            np.testing.assert_allclose(together[i, :len(y)], alone[0, :len(y)], atol=1e-5, err_msg=str(i))
            assert not together[i, len(y):].any()


def test_logprobs_do_not_depend_on_the_other_rows_of_the_batch():
    model = tiny_gpt()
    with no_grad():
        full = sequence_logprobs(model, from_responses(PROMPTS, RESPONSES, PAD)).data
        order = [3, 0, 4, 1, 2]
        shuffled = sequence_logprobs(model, from_responses([PROMPTS[i] for i in order],
                                                           [RESPONSES[i] for i in order], PAD)).data
        half = sequence_logprobs(model, from_responses(PROMPTS[:2], RESPONSES[:2], PAD)).data
    np.testing.assert_allclose(shuffled, full[order], atol=1e-5)
    np.testing.assert_allclose(half, full[:2], atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.7])
def test_trainer_logprobs_equal_the_samplers_at_every_temperature(temperature):
    """The sampler (KV cache, one token at a time) and the trainer (one full forward) agree on
    log π(y_t) of the sampled tokens at the sampling temperature, so π/π_old = 1 at the first epoch."""
    model = tiny_gpt()
    batch = sample(model, PROMPTS, np.arange(len(PROMPTS)), 3, temperature, 6, EOS, PAD, seed=3)
    assert batch.temperature == temperature
    with no_grad():
        logp = response_logprobs(model, batch).data
    np.testing.assert_allclose(logp, batch.logprobs * batch.mask, atol=1e-5)


def test_forgetting_the_temperature_would_move_the_first_ratio_away_from_one():
    """The check above can fail: scored at temperature 1, samples drawn at 0.5 give ratios far from 1."""
    model = tiny_gpt()
    batch = sample(model, PROMPTS, np.arange(len(PROMPTS)), 3, 0.5, 6, EOS, PAD, seed=3)
    wrong = Rollout(batch.prompt_ids, batch.prompt_mask, batch.tokens, batch.mask, batch.index, batch.logprobs, 1.0)
    with no_grad():
        logp = response_logprobs(model, wrong).data
    assert np.abs((logp - batch.logprobs) * batch.mask).max() > 0.01


def test_a_greedy_rollout_is_scored_at_temperature_one():
    model = tiny_gpt()
    batch = sample(model, PROMPTS, np.arange(len(PROMPTS)), 1, 0.0, 4, EOS, PAD, seed=0)
    assert batch.temperature == 1.0
    with no_grad():
        np.testing.assert_allclose(response_logprobs(model, batch).data, batch.logprobs * batch.mask, atol=1e-5)


def test_nan_logits_under_the_mask_reach_neither_logprobs_nor_gradients():
    """0·NaN = NaN: whatever sits under the response mask (here NaN logits at every padded position) must be
    cut out before any product, or one NaN poisons the whole gradient (the masked-mean bug class, e.g.
    OpenRLHF's and verl's fixes that replaced x * mask by masked_fill/where)."""
    model = tiny_gpt()
    batch = from_responses(PROMPTS, RESPONSES, PAD)
    lm_logits = model.lm_logits
    model.lm_logits = lambda h: F.where(batch.mask[..., None] > 0, lm_logits(h), float("nan"))
    logp = response_logprobs(model, batch)
    assert np.isfinite(logp.data).all() and not logp.data[batch.mask == 0].any()
    logp.sum().backward()
    assert all(np.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert np.abs(model.wte.weight.grad).sum() > 0


def test_rows_and_responses_keep_what_each_row_answers():
    batch = from_responses(PROMPTS, RESPONSES, PAD, index=[4, 3, 2, 1, 0])
    part = batch.rows([1, 3])
    assert part.index.tolist() == [3, 1] and part.responses() == [RESPONSES[1], RESPONSES[3]]
    assert part.lengths().tolist() == [2, 1]
    with pytest.raises(ValueError, match="one each"):
        from_responses(PROMPTS, RESPONSES[:2], PAD)


def test_rollout_logprobs_use_the_models_own_lm_head_on_an_untied_llama():
    """A Llama with an untied LM head: the trainer's log-probs must come through lm_head, not the embedding,
    and equal what the sampler drew from."""
    from minirlhf.llama import Llama, LlamaConfig
    minirlhf.manual_seed(0)
    model = Llama(LlamaConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=32, vocab_size=12,
                              block_size=16, tie_word_embeddings=False))
    assert model.lm_head is not None
    batch = sample(model, PROMPTS, np.arange(len(PROMPTS)), 2, 0.8, 5, EOS, PAD, seed=4)
    with no_grad():
        logp = response_logprobs(model, batch).data
    np.testing.assert_allclose(logp, batch.logprobs * batch.mask, atol=1e-5)


# ----------------------------------------------------------- shared prompts
def tiny_llama(seed=0):
    from minirlhf.llama import Llama, LlamaConfig
    minirlhf.manual_seed(seed)
    return Llama(LlamaConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=32, vocab_size=12,
                             block_size=16))


def _one_forward_each(rollout):
    """The same rows with every index distinct: no prompt shared, one forward over [prompt | response]."""
    return Rollout(rollout.prompt_ids, rollout.prompt_mask, rollout.tokens, rollout.mask,
                   np.arange(len(rollout)), rollout.logprobs, rollout.temperature)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad.copy() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [tiny_gpt, tiny_llama], ids=["gpt", "llama"])
@pytest.mark.parametrize("last", [False, True])
def test_a_prompt_shared_by_several_responses_gives_the_states_and_gradients_of_one_forward_each(make, last):
    """response_hidden computes a prompt once for the rows that answer it (PrefixCache); the states and
    every parameter's gradient equal those of one full forward per row, for groups (GRPO) and pairs (DPO)
    of left-padded prompts of different lengths and right-padded responses."""
    model = make()
    rng = np.random.default_rng(0)
    groups = sample(model, PROMPTS, np.arange(len(PROMPTS)), 3, 1.0, 5, EOS, PAD, seed=1)
    pairs = from_responses(PROMPTS * 2, RESPONSES + RESPONSES[::-1], PAD)
    assert pairs.index.tolist() == list(range(5)) * 2  # equal prompts get the same index by default
    for rollout in (groups, pairs):
        weights = rng.standard_normal((len(rollout), rollout.tokens.shape[1] + last, 16)).astype(np.float32)
        shared = response_hidden(model, rollout, last=last)
        alone = response_hidden(model, _one_forward_each(rollout), last=last)
        np.testing.assert_allclose(shared.data, alone.data, atol=2e-6)
        g_shared = _grads(model, (shared * weights).sum())
        g_alone = _grads(model, (alone * weights).sum())
        assert g_shared.keys() == g_alone.keys()
        for name in g_alone:
            scale = max(1.0, np.abs(g_alone[name]).max())
            np.testing.assert_allclose(g_shared[name], g_alone[name], atol=2e-6 * scale, rtol=0, err_msg=name)


def test_one_token_responses_read_only_their_prompts_state():
    model = tiny_gpt()
    rollout = from_responses(PROMPTS[:2] * 2, [[EOS], [5], [6], [EOS]], PAD)
    with no_grad():
        np.testing.assert_allclose(sequence_logprobs(model, rollout).data,
                                   sequence_logprobs(model, _one_forward_each(rollout)).data, atol=1e-6)


def test_rows_whose_index_names_another_prompt_are_refused():
    rollout = from_responses(PROMPTS[:2], RESPONSES[:2], PAD, index=[0, 0])
    with pytest.raises(ValueError, match="same index hold different prompt_ids"):
        response_hidden(tiny_gpt(), rollout)


def test_a_prefix_cache_continues_its_prompts_once():
    model = tiny_gpt()
    cache = PrefixCache(np.array([0, 0]))
    model.hidden(np.array([[1, 2, 3]]), cache=cache)
    model.hidden(np.array([[4], [5]]), np.ones((2, 4)), cache=cache)
    with pytest.raises(ValueError, match="continued once"):
        model.hidden(np.array([[4], [5]]), np.ones((2, 5)), cache=cache)
