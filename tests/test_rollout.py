"""Rollouts: log π of sampled responses is what the sampler drew from, whatever the padding or the batch."""
import numpy as np
import pytest

import minirlhf
import minirlhf.functional as F
from minirlhf.model import GPT, GPTConfig
from minirlhf.rollout import Rollout, from_responses, response_logprobs, sample, sequence_logprobs
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
