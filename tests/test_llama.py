"""Llama, Qwen2 and Qwen3 against ``transformers``: logits (plain, left-padded, with the KV cache),
greedy generation and gradients, from tiny random models saved with save_pretrained."""
import numpy as np
import pytest

import minirlhf
import minirlhf.functional as F
from minirlhf import no_grad
from minirlhf.llama import Llama, LlamaConfig, LlamaRewardModel, positions_and_key_mask, rope_frequencies
from minirlhf.sampling import generate
from hf_models import FAMILIES, VOCAB, left_padded, positions, saved

torch = pytest.importorskip("torch")

ALL = sorted(FAMILIES)


@pytest.fixture(params=ALL)
def pair(request, tmp_path):
    """(family, the transformers model, ours loaded from its directory)."""
    hf, path = saved(request.param, tmp_path)
    return request.param, hf, Llama.from_pretrained(path)


def hf_logits(hf, ids, mask=None):
    with torch.no_grad():
        if mask is None:
            return hf(torch.from_numpy(ids)).logits.numpy()
        return hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  position_ids=torch.from_numpy(positions(mask))).logits.numpy()


# ------------------------------------------------------------------ logits
def test_logits_equal_transformers(pair, rng):
    _, hf, model = pair
    ids = rng.integers(0, VOCAB, (2, 20))
    want = hf_logits(hf, ids)
    assert np.abs(want).max() > 1  # logits of order 1: a 1e-4 tolerance is a real test
    with no_grad():
        np.testing.assert_allclose(model(ids).data, want, atol=1e-4, rtol=0)


def test_left_padded_logits_equal_transformers_and_the_unpadded_rows(pair, rng):
    _, hf, model = pair
    ids, mask = left_padded(rng)
    with no_grad():
        got = model(ids, mask).data
    real = mask[..., None] == 1
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, hf_logits(hf, ids, mask), 0), atol=1e-4)
    for i in range(len(ids)):
        start = int((mask[i] == 0).sum())
        with no_grad():
            alone = model(ids[i:i + 1, start:]).data[0]
        np.testing.assert_allclose(got[i, start:], alone, atol=1e-4)


def test_positions_count_real_tokens_so_padding_never_shifts_the_rotary_angles():
    """RoPE scores depend only on position differences, so a shift would cancel in exact arithmetic
    (the logit tests cannot see it); the positions themselves are the padded row's unpadded ones."""
    cfg = tiny()
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=np.float32)
    ids = np.ones((2, 5), dtype=np.int64)
    got, key_mask = positions_and_key_mask(ids, mask, None, cfg, np, "Llama")
    np.testing.assert_array_equal(got, [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(key_mask[:, 0, 0], mask == 1)
    cache = Llama(cfg).new_cache()
    cache.length = 5
    mask = np.concatenate([mask, np.ones((2, 1), dtype=np.float32)], axis=1)
    got, _ = positions_and_key_mask(ids[:, :1], mask, cache, cfg, np, "Llama")
    np.testing.assert_array_equal(got, [[3], [5]])


def test_cached_decoding_equals_the_full_forward_and_transformers(pair, rng):
    _, hf, model = pair
    ids, mask = left_padded(rng, T=14)
    want = hf_logits(hf, ids, mask)
    cache = model.new_cache()
    with no_grad():
        steps = [model(ids[:, :6], mask[:, :6], cache=cache).data]
        for t in range(6, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], mask[:, :t + 1], cache=cache).data)
    got = np.concatenate(steps, axis=1)
    real = mask[..., None] == 1
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-4)


def test_the_cache_holds_the_key_value_heads_not_the_query_heads(pair, rng):
    _, _, model = pair
    cache = model.new_cache()
    with no_grad():
        model(rng.integers(0, VOCAB, (2, 5)), cache=cache)
    cfg = model.config
    assert cfg.n_kv_head < cfg.n_head
    assert cache.length == 5
    assert cache.keys[0].shape[:2] == (2, cfg.n_kv_head) and cache.keys[0].shape[3] == cfg.head_dim


def test_float64_loading_matches_transformers_in_float64(tmp_path, rng):
    hf, path = saved("qwen3", tmp_path)
    model = Llama.from_pretrained(path, dtype=np.float64)
    assert all(p.dtype == np.float64 for p in model.parameters())
    ids = rng.integers(0, VOCAB, (2, 16))
    with torch.no_grad():
        want = hf.double()(torch.from_numpy(ids)).logits.numpy()
    with no_grad():
        got = model(ids).data
    assert got.dtype == np.float64
    # transformers computes the rotary angles in float32 even in a float64 model; ours stay float64
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


# -------------------------------------------------------------- generation
def test_greedy_generation_gives_the_tokens_of_transformers_generate(pair):
    _, hf, model = pair
    prompts = [[5, 17, 33, 2, 9, 41], [7, 8], [60, 61, 62, 63]]
    out = generate(model, prompts, max_new_tokens=10, temperature=0, pad_id=0)
    ids, mask = out.prompt_ids, out.prompt_mask
    with torch.no_grad():
        want = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                           max_new_tokens=10, do_sample=False, pad_token_id=0)[:, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(out.tokens, want)


# --------------------------------------------------------------- gradients
def test_gradients_equal_transformers(pair, rng):
    family, hf, model = pair
    ids, mask = left_padded(rng, B=2, T=10)
    logits = model(ids[:, :-1], mask[:, :-1])
    loss = F.cross_entropy(logits, ids[:, 1:], mask=mask[:, 1:])
    loss.backward()
    hf.zero_grad()
    t_logits = hf(torch.from_numpy(ids[:, :-1]), attention_mask=torch.from_numpy(mask[:, :-1]),
                  position_ids=torch.from_numpy(positions(mask[:, :-1]))).logits
    weights = torch.from_numpy(mask[:, 1:]).reshape(-1)
    t_loss = (torch.nn.functional.cross_entropy(t_logits.reshape(-1, VOCAB), torch.from_numpy(ids[:, 1:]).reshape(-1),
                                                reduction="none") * weights).sum() / weights.sum()
    t_loss.backward()
    assert loss.item() == pytest.approx(t_loss.item(), abs=1e-5)
    theirs = {n.removeprefix("model."): p.grad.numpy() for n, p in hf.named_parameters()}
    ours = dict(model.named_parameters())
    assert set(ours) == set(theirs)
    for name, p in ours.items():
        scale = max(1.0, np.abs(theirs[name]).max())
        np.testing.assert_allclose(p.grad, theirs[name], atol=2e-5 * scale, rtol=0, err_msg=f"{family}: {name}")


# -------------------------------------------------------------- the heads
def tiny(**overrides):
    minirlhf.manual_seed(0)
    settings = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48, vocab_size=VOCAB,
                    block_size=32)
    return LlamaConfig(**{**settings, **overrides})


def test_value_head_gives_one_value_per_token_and_leaves_the_logits(rng):
    plain, with_values = Llama(tiny()), Llama(tiny(), value_head=True)
    with_values.load_state_dict(plain.state_dict(), strict=False)
    ids = rng.integers(0, VOCAB, (2, 7))
    with no_grad():
        logits, values = with_values(ids, return_values=True)
        np.testing.assert_array_equal(logits.data, plain(ids).data)
    assert values.shape == (2, 7)
    with pytest.raises(ValueError, match="needs a value head"):
        plain(ids, return_values=True)


def test_reward_model_on_a_llama_trunk_scores_each_row_as_it_would_alone(rng):
    policy = Llama(tiny(qk_norm=True, qkv_bias=True))
    rm = LlamaRewardModel.from_gpt(policy)
    ids, mask = rng.integers(0, VOCAB, (3, 8)), np.ones((3, 8), dtype=np.float32)
    mask[1, :3] = 0
    with no_grad():
        scores = rm(ids, mask).data
        alone = rm(ids[1:2, 3:]).data
    assert scores.shape == (3,)
    np.testing.assert_allclose(scores[1], alone[0], atol=1e-5)
    np.testing.assert_array_equal(rm.transformer.embed_tokens.weight.data, policy.embed_tokens.weight.data)


def test_save_and_load_round_trip_keeps_config_and_logits(tmp_path, rng):
    model = Llama(tiny(tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8}), value_head=True)
    model.save(tmp_path / "ckpt")
    loaded = Llama.load(tmp_path / "ckpt")
    assert loaded.config == model.config and loaded.value_head is not None
    ids = rng.integers(0, VOCAB, (2, 9))
    with no_grad():
        np.testing.assert_array_equal(loaded(ids).data, model(ids).data)


def test_tied_model_has_no_separate_head_and_untied_one_does():
    assert "lm_head.weight" not in Llama(tiny()).state_dict()
    untied = Llama(tiny(tie_word_embeddings=False))
    assert untied.lm_head_weight is untied.lm_head.weight


# ------------------------------------------------------ rotary frequencies
def test_llama3_scaling_keeps_high_frequencies_divides_low_ones_and_blends_between():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    plain, scaled = rope_frequencies(128, 500000.0), rope_frequencies(128, 500000.0, scaling)
    wavelength = 2 * np.pi / plain
    high, low = wavelength < 8192 / 4, wavelength > 8192 / 1
    middle = ~high & ~low
    assert high.any() and low.any() and middle.any()
    np.testing.assert_array_equal(scaled[high], plain[high])
    np.testing.assert_allclose(scaled[low], plain[low] / 8)
    assert np.all((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 8))


def test_rope_frequencies_match_transformers_llama3_init():
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    transformers = pytest.importorskip("transformers")
    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64,
                                      max_position_embeddings=131072, rope_parameters=params)
    inv_freq, _ = rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = rope_frequencies(64, 500000.0, {k: v for k, v in params.items() if k != "rope_theta"})
    np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)


# ------------------------------------------------------------ bad settings
@pytest.mark.parametrize("overrides, message", [
    (dict(n_head=6, n_kv_head=4), r"n_head \(6\) must be a multiple of n_kv_head \(4\)"),
    (dict(n_embd=30), r"n_embd \(30\) must be divisible by n_head \(4\)"),
    (dict(head_dim=7), "head_dim must be a positive even integer"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling must be None or"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 4.0}), r"needs numbers for \['low_freq_factor'"),
])
def test_config_names_what_is_wrong(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_ids_out_of_range_and_a_mask_of_the_wrong_shape_are_named(rng):
    model = Llama(tiny())
    with pytest.raises(ValueError, match=r"ids must lie in \[0, vocab_size=96\)"):
        model(np.array([[VOCAB]]))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(B, cached \+ T\) = \(1, 3\)"):
        model(np.array([[1, 2, 3]]), np.ones((1, 4)))
