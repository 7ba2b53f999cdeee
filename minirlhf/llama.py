"""Llama: the decoder of today's small open models (Llama 3, Qwen2/2.5, Qwen3, SmolLM2), so their
Hugging Face checkpoints load, with the same heads and interface as :class:`~minirlhf.model.GPT`.

    x₀ = embed_tokens[ids]                                         (no position table)
    xₗ₊₁ = xₗ + attn(rms_norm(xₗ)),  then  xₗ₊₁ ← xₗ₊₁ + mlp(rms_norm(xₗ₊₁))
    h = rms_norm(x_L);  logits = h · lm_headᵀ                       (lm_head = embed_tokens when tied)

The block is GPT-2's pre-norm block with its parts replaced. Side by side with ``model.py``:

    GPT-2 (model.py)                          Llama family (here)
    LayerNorm (centre, scale, shift)          RMSNorm: x / √(mean(x²) + ε) · g (Zhang & Sennrich 2019)
    learned position table wpe[t] added       rotary embedding of q and k (Su et al. 2021): attention
      to the input                              scores depend on the distance between positions only
    n_head K/V heads                          n_kv_head ≤ n_head K/V heads, each shared by a group of
                                                n_head / n_kv_head query heads (GQA, Ainslie et al. 2023)
    MLP: W₂ GELU(W₁ x), 4C wide               SwiGLU: W_down (silu(W_gate x) ∘ W_up x) (Shazeer 2020)
    biases everywhere                         no biases (Qwen2: on q, k, v)
    LM head tied to wte                       tied or a separate lm_head (tie_word_embeddings)
    (nothing)                                 Qwen3: an RMSNorm on each head of q and k before RoPE

The three families differ only by switches of :class:`LlamaConfig`, so they share this one file,
and GPT-2 keeps its own: a reader compares two short files rather than one with branches for both.

    Llama 3.x   rope_scaling={"rope_type": "llama3", ...} (3.1 and later), tied in the small models
    Qwen2/2.5   qkv_bias=True, rope_theta=1e6
    Qwen3       qk_norm=True, head_dim=128 whatever n_embd / n_head
    SmolLM2     plain Llama, tied

Rotary embedding, HF's rotate-half layout: head dimension i and i + d/2 form a pair rotated by the
angle position · θᵢ, θᵢ = rope_theta^(−2i/d) (Su et al. 2021, eq. 34, with the pairs split in halves
instead of interleaved; HF's checkpoints are permuted to this layout). Llama 3.1's ``rope_scaling``
stretches the long wavelengths by ``factor`` and blends the middle band (Meta's llama3 rule).

Padding, KV cache and heads as for GPT: left-padded rows take positions cumsum(mask) − 1, so a
padded row gives the logits of the same row unpadded (rotary scores depend only on position
differences, so a shift would cancel in exact arithmetic; counting real tokens gives a padded
row the very angles of the unpadded one, and keeps positions within the context); the cache holds the n_kv_head K/V heads
(not the n_head they serve); ``value_head`` gives V(s_t) for PPO, :class:`LlamaRewardModel` a
scalar reward.
"""
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from . import backend
from . import functional as F
from . import nn
from .model import GPT, KVCache, RewardModel, _as_array, _check_last


@dataclass
class LlamaConfig:
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    n_embd: int = 576
    intermediate_size: int = 1536
    vocab_size: int = 49152
    block_size: int = 8192              # max_position_embeddings: the longest sequence (prompt + response)
    head_dim: int = 0                   # 0: n_embd // n_head (Qwen3 sets it apart)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = None           # None, or Llama 3.1's {"rope_type": "llama3", "factor", ...}
    qkv_bias: bool = False              # Qwen2: biases on the q, k, v projections
    o_bias: bool = False                # Llama's attention_bias=True: a bias on the output projection too
    qk_norm: bool = False               # Qwen3: RMSNorm over each head of q and k
    tie_word_embeddings: bool = True

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "vocab_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"LlamaConfig: {name} must be a positive integer, got {value!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"LlamaConfig: n_head ({self.n_head}) must be a multiple of n_kv_head "
                             f"({self.n_kv_head}): each K/V head serves a whole group of query heads")
        if self.head_dim == 0:
            if self.n_embd % self.n_head:
                raise ValueError(f"LlamaConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) "
                                 "unless head_dim is given")
            self.head_dim = self.n_embd // self.n_head
        if not isinstance(self.head_dim, (int, np.integer)) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim must be a positive even integer (rotary pairs), "
                             f"got {self.head_dim!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig: rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling is not None:
            _check_llama3_scaling(self.rope_scaling)


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _check_llama3_scaling(scaling):
    if not isinstance(scaling, dict) or scaling.get("rope_type") != "llama3":
        raise ValueError(f"LlamaConfig: rope_scaling must be None or {{'rope_type': 'llama3', ...}}, got {scaling!r}")
    missing = [k for k in _LLAMA3_KEYS if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise ValueError(f"LlamaConfig: rope_scaling of type llama3 needs numbers for {missing}, got {scaling!r}")
    unknown = sorted(set(scaling) - set(_LLAMA3_KEYS) - {"rope_type"})
    if unknown:
        raise ValueError(f"LlamaConfig: rope_scaling has settings this model does not implement: {unknown}")
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(f"LlamaConfig: rope_scaling needs high_freq_factor > low_freq_factor, got {scaling!r}")


def rope_frequencies(head_dim, theta, scaling=None):
    """θᵢ = theta^(−2i/d) for i < d/2 (float64), with Llama 3.1's scaling if given.

    llama3, with L the original context and λ = 2π/θ the wavelength of a pair: where λ > L/low_freq_factor,
    θ ← θ/factor (long wavelengths stretched); where λ < L/high_freq_factor, θ is kept; in between
    θ ← (1 − s) θ/factor + s θ with s = (L/λ − low_freq_factor) / (high_freq_factor − low_freq_factor).
    """
    theta_i = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return theta_i
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    L = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / theta_i
    s = (L / wavelength - low) / (high - low)
    blended = (1 - s) * theta_i / factor + s * theta_i
    return np.where(wavelength > L / low, theta_i / factor, np.where(wavelength < L / high, theta_i, blended))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        self.eps = eps
        self.weight = nn.Parameter(np.ones(dim, dtype=np.float32))

    def forward(self, x):
        return F.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Causal self-attention with rotary q, k and grouped K/V heads."""

    def __init__(self, cfg):
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        C, D = cfg.n_embd, cfg.head_dim
        self.q_proj = nn.Linear(C, cfg.n_head * D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, cfg.n_kv_head * D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, cfg.n_kv_head * D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * D, C, bias=cfg.o_bias)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, key_mask=None, cache=None, layer=0, last=None):
        """The attention's output, (B, T, C); with ``last``, only for the last ``last`` queries (projected
        from those positions alone), which still attend over every position's keys and values."""
        B, T, _ = x.shape
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        T_q = T if last is None else last
        q = self.q_proj(x[:, T - T_q:] if last is not None else x).reshape(B, T_q, H, D)
        k = self.k_proj(x).reshape(B, T, H_kv, D)
        v = self.v_proj(x).reshape(B, T, H_kv, D).transpose(1, 2)  # (B, H_kv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = F.rotary_embedding(q.transpose(1, 2), cos[..., T - T_q:, :], sin[..., T - T_q:, :])  # (B, H, T_q, D)
        k = F.rotary_embedding(k.transpose(1, 2), cos, sin)  # (B, H_kv, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=True)  # (B, H, T_q, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T_q, H * D))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) ∘ up(x)) (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6)."""

    def __init__(self, cfg):
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, key_mask=None, cache=None, layer=0, last=None):
        """x (B, T, C) → (B, T, C); with ``last``, the last ``last`` positions' outputs alone."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, key_mask, cache, layer, last)
        x = x + attended if last is None else x[:, x.shape[1] - last:] + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """A Llama-family language model; ``Llama(cfg, value_head=True)`` adds a per-token value head for PPO.

    ``model(ids, attention_mask=None, cache=None, return_values=False)`` → logits (B, T, V)
    [, values (B, T)], exactly as :class:`~minirlhf.model.GPT`. Parameter names are Hugging
    Face's without the leading ``model.``. Initialisation as ``transformers``: weights
    N(0, 0.02), biases 0, norms 1, drawn from the generator seeded by ``minirlhf.manual_seed``.
    """

    def __init__(self, config, value_head=False):
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"Llama: config must be a LlamaConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.value_head = nn.Linear(config.n_embd, 1) if value_head else None
        self.theta = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)  # (D/2,) float64
        _init_llama(self)

    @property
    def wte(self):
        """The token embedding under GPT's name, so code written for GPT (``generate``) finds the device."""
        return self.embed_tokens

    @property
    def lm_head_weight(self):
        """The (V, C) matrix that turns hidden states into logits: lm_head, or the embedding when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # ------------------------------------------------------------ forward
    def hidden(self, ids, attention_mask=None, cache=None, last=None):
        """Hidden states after the final RMSNorm, (B, T, C); with ``last``, the last ``last`` positions'
        alone, the last block's other queries, attention and MLP skipped (as :meth:`GPT.hidden`)."""
        xp = self.embed_tokens.weight.xp
        ids = _as_array(ids, xp)
        positions, key_mask = positions_and_key_mask(ids, attention_mask, cache, self.config, xp, "Llama")
        last = _check_last(last, ids.shape[1], "Llama")
        angles = positions[..., None] * xp.asarray(self.theta)            # (B, T, D/2), float64
        angles = xp.concatenate([angles, angles], axis=-1)[:, None]       # (B, 1, T, D): every head alike
        dtype = self.embed_tokens.weight.dtype
        cos, sin = xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)
        x = self.embed_tokens(ids)
        for layer, block in enumerate(self.layers):
            x = block(x, cos, sin, key_mask, cache, layer, last if layer == len(self.layers) - 1 else None)
        if cache is not None:
            cache.length += ids.shape[1]
        return self.norm(x)

    def forward(self, ids, attention_mask=None, cache=None, return_values=False):
        h = self.hidden(ids, attention_mask, cache)
        if not return_values:
            return self.lm_logits(h)
        return self.lm_logits(h), self.values(h)

    def lm_logits(self, h):
        """Next-token logits (..., V) from hidden states (..., C), through lm_head (the embedding when tied)."""
        return F.linear(h, self.lm_head_weight)

    values = GPT.values

    def new_cache(self):
        """An empty KV cache of the n_kv_head K/V heads, up to block_size positions."""
        return KVCache(self.config.n_layer, self.config.block_size)

    # --------------------------------------------------------- weights & files
    copy = GPT.copy
    save = GPT.save
    load = classmethod(GPT.load.__func__)

    def config_dict(self):
        return {"architecture": type(self).__name__, **asdict(self.config),
                "value_head": self.value_head is not None}

    @classmethod
    def _from_config_dict(cls, stored):
        return cls(_config_from(stored), value_head=bool(stored.get("value_head", False)))

    @classmethod
    def from_pretrained(cls, path, dtype=np.float32):
        """Load a Hugging Face ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM``
        directory (config.json and safetensors, single or sharded) in float32 or float64; see
        :func:`minirlhf.hf.load_hf_llama`. Nothing is downloaded."""
        from .checkpoint import rng_state, set_rng_state
        from .hf import check_state, load_hf_llama
        settings, state = load_hf_llama(path, dtype)
        cfg = LlamaConfig(**settings)
        before = rng_state()  # building the model draws an init that the stored weights replace
        model = cls(cfg)
        set_rng_state(before)
        check_state(model, state, path)
        model.to(np.dtype(dtype).type)
        model.load_state_dict(state)
        return model


def _config_from(stored):
    return LlamaConfig(**{f.name: stored[f.name] for f in fields(LlamaConfig) if f.name in stored})


def positions_and_key_mask(ids, attention_mask, cache, cfg, xp, who):
    """Check ids (B, T) and the mask; return positions (B, T) and the key mask (B, 1, 1, S) or None.

    Positions skip left padding: position = cumsum(mask) − 1, clipped at 0, counted over the cached
    columns too, so a padded row sees the same positions as the row unpadded.
    """
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"{who}: ids must be a 2-d integer array (B, T), got shape {ids.shape} dtype {ids.dtype}")
    if ids.size == 0:
        raise ValueError(f"{who}: ids is empty (shape {ids.shape})")
    B, T = ids.shape
    past = cache.length if cache is not None else 0
    if past + T > cfg.block_size:
        raise ValueError(f"{who}: sequence length {past + T} (cached {past} + new {T}) exceeds "
                         f"block_size={cfg.block_size}")
    # on CuPy this check would cost a device→host sync every forward, so it runs on NumPy only
    if xp is np and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise ValueError(f"{who}: ids must lie in [0, vocab_size={cfg.vocab_size}), got min {int(ids.min())} "
                         f"max {int(ids.max())}")
    if attention_mask is None:
        return xp.broadcast_to(xp.arange(past, past + T)[None, :], (B, T)), None
    mask = _as_array(attention_mask, xp)
    if mask.shape != (B, past + T):
        raise ValueError(f"{who}: attention_mask must have shape (B, cached + T) = {(B, past + T)}, got {mask.shape}")
    mask = mask != 0
    positions = xp.maximum(xp.cumsum(mask, axis=1) - 1, 0)[:, past:]
    return positions, mask[:, None, None, :]  # every head and query sees the same keys


def _init_llama(module):
    rng = backend.generator("cpu")
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            p.data = np.zeros(p.shape, dtype=p.dtype)
        elif name.endswith("norm.weight"):
            p.data = np.ones(p.shape, dtype=p.dtype)
        else:
            p.data = (rng.standard_normal(p.shape, dtype=np.float32) * np.float32(0.02)).astype(p.dtype)


class LlamaRewardModel(RewardModel):
    """:class:`~minirlhf.model.RewardModel` on a Llama trunk: the same r(x, y) and the same heads."""

    trunk = Llama

    @classmethod
    def _from_config_dict(cls, stored):
        return cls(_config_from(stored))
