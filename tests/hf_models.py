"""Tiny random Llama / Qwen2 / Qwen3 models made with ``transformers`` (nothing downloaded), saved with
``save_pretrained`` for the loading tests.

The weights are redrawn larger than ``transformers``' N(0, 0.02) init (norms around 1), so logits are
of order 1 and a wrong rotation, a missing bias or a swapped head changes them well beyond 1e-4.
"""
import numpy as np
import pytest

VOCAB = 96

FAMILIES = {
    # Llama 3.1's rope scaling, untied head; original context 16 < the tests' lengths, so every band is used
    "llama": ("LlamaConfig", dict(head_dim=16, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, tie_word_embeddings=False)),
    # q/k/v biases, tied embedding, large theta
    "qwen2": ("Qwen2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                  tie_word_embeddings=True)),
    # per-head q/k RMSNorm, head_dim apart from hidden / heads
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=False)),
}


def hf_model(family, seed=0, **overrides):
    """A random transformers model of ``family`` in eval mode, float32."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    name, settings = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, name)(**{
        **dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=None,
               eos_token_id=None, pad_token_id=None), **settings, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return model


def saved(family, path, seed=0, **save_kwargs):
    """(the transformers model, path) after save_pretrained(path)."""
    model = hf_model(family, seed)
    model.save_pretrained(path, **save_kwargs)
    return model, path


def left_padded(rng, B=3, T=12):
    """Random ids (B, T) and a left-padding mask: row i has 3·i padding columns."""
    ids = rng.integers(0, VOCAB, (B, T))
    mask = np.ones((B, T), dtype=np.float32)
    for i in range(B):
        mask[i, :3 * i] = 0
    return ids, mask


def positions(mask):
    """The position ids that make a left-padded row look unpadded (as HF's generate computes them)."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
