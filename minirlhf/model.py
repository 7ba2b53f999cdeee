"""GPT: the GPT-2 decoder (Radford et al. 2019), so real GPT-2 checkpoints load, plus the heads RLHF needs.

    x₀ = wte[ids] + wpe[positions]
    xₗ₊₁ = xₗ + attn(ln_1(xₗ)),  then  xₗ₊₁ ← xₗ₊₁ + mlp(ln_2(xₗ₊₁))       (pre-LayerNorm blocks)
    h = ln_f(x_L);  logits = h · wteᵀ                                      (LM head tied to the embedding)

attn is causal multi-head self-attention (``F.scaled_dot_product_attention``), mlp is
Linear(C, 4C) → GELU (tanh form) → Linear(4C, C). ``dropout`` applies to the embeddings and to
each residual branch (GPT-2 also drops attention probabilities; this attention does not).

Padding: batches of prompts are LEFT-padded, with ``attention_mask`` (B, S) 1 on real tokens.
Padded keys are masked out of attention, and positions skip the padding
(position = cumsum(mask) − 1, clipped at 0), so a left-padded row gives the same
logits on its real tokens as the same row without padding.

KV cache: decoding token by token, each layer appends the new keys and values to a
:class:`KVCache` and attends over all of them; the logits equal those of one full forward.
A :class:`PrefixCache` holds the keys and values of prompts as Tensors, so that responses sharing a
prompt read it from one forward of the prompt, gradients included.

Heads: ``value_head`` (a per-token scalar V(s_t) for PPO) and :class:`RewardModel`
(a scalar r(x, y) from per-token scores of the response and the last real token's state, for
Bradley-Terry training).
"""
import copy
import math
import numbers
from dataclasses import asdict, dataclass, fields

import numpy as np

from . import backend
from . import functional as F
from . import nn
from .tensor import Tensor, is_grad_enabled


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    block_size: int = 1024
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"GPTConfig: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout}")


class KVCache:
    """Keys and values of the positions decoded so far, one (B, H, S, D) pair per layer.

    ``length`` is the number of cached positions. Buffers grow by doubling, so
    appending one token copies nothing in the common case. Cached keys are
    constants: gradients flow only through the keys of the current call.
    """

    def __init__(self, n_layer, max_len):
        self.max_len = max_len
        self.length = 0
        self.keys = [None] * n_layer
        self.values = [None] * n_layer

    def update(self, layer, k, v):
        """Append k, v (B, H, T, D) after the cached positions; return all keys and values (B, H, S, D)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache: {end} positions exceed max_len={self.max_len} (block_size)")
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is not None and buf_k.shape[0] != k.shape[0]:
            raise ValueError(f"KVCache: batch size changed from {buf_k.shape[0]} to {k.shape[0]}; "
                             "start a new cache with model.new_cache()")
        if buf_k is None or end > buf_k.shape[2]:
            capacity = min(self.max_len, max(end, 2 * (0 if buf_k is None else buf_k.shape[2]), 16))
            xp = k.xp
            new_k = xp.empty(k.shape[:2] + (capacity,) + k.shape[3:], dtype=k.dtype)
            new_v = xp.empty(v.shape[:2] + (capacity,) + v.shape[3:], dtype=v.dtype)
            if start:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]
            buf_k, buf_v = self.keys[layer], self.values[layer] = new_k, new_v
        buf_k[:, :, start:end] = k.data
        buf_v[:, :, start:end] = v.data
        if start == 0:
            return k, v
        if is_grad_enabled() and (k.requires_grad or v.requires_grad):
            return (F.cat([Tensor(buf_k[:, :, :start]), k], axis=2),
                    F.cat([Tensor(buf_v[:, :, :start]), v], axis=2))
        return Tensor(buf_k[:, :, :end]), Tensor(buf_v[:, :, :end])


class PrefixCache:
    """The keys and values of U prompts kept as Tensors, read by B rows that continue them:
    ``rows[i]`` is the prompt that row i continues.

        model.hidden(prompts, prompt_mask, cache=c)               (U, T): records each layer's K, V
        model.hidden(continuations, [prompt_mask[rows] | mask], cache=c)   (B, N): attends over both

    A causal model's states on a prompt never depend on what follows it, so a prompt answered by G
    responses (a GRPO group, a preference pair) is computed once instead of G times, exactly; the
    gradient that reaches its keys and values is the sum over the rows that read them (the backward of
    the row gather). With dropout, the rows of a group share the prompt's dropout mask.
    """

    def __init__(self, rows):
        self.rows = rows
        self.length = 0
        self.keys, self.values = [], []

    def update(self, layer, k, v):
        if self.length == 0:                       # the prompt pass
            self.rows = backend.to_device(self.rows, k.device)
            self.keys.append(k)
            self.values.append(v)
            return k, v
        past_k, past_v = self.keys[layer], self.values[layer]
        if self.length != past_k.shape[2]:
            raise ValueError("PrefixCache: its prompts are continued once; build a new cache for another pass")
        return F.cat([past_k[self.rows], k], axis=2), F.cat([past_v[self.rows], v], axis=2)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, key_mask=None, cache=None, layer=0, last=None):
        """The attention's output, (B, T, C); with ``last``, only for the last ``last`` queries, which
        still attend over the keys and values of every position."""
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        qkv = self.c_attn(x).reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if last is not None:
            q, T = q[:, :, T - last:], last  # causal masks align the queries with the last keys
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=True)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg):
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, key_mask=None, cache=None, layer=0, last=None):
        """x (B, T, C) → (B, T, C); with ``last``, the last ``last`` positions' outputs alone."""
        attended = self.attn(self.ln_1(x), key_mask, cache, layer, last)
        x = x + attended if last is None else x[:, x.shape[1] - last:] + attended
        return x + self.mlp(self.ln_2(x))


def _check_last(last, T, model):
    """``last`` as the number of trailing positions a forward keeps: None (all T) or an int in [1, T]."""
    if last is None or last == T:
        return None
    if isinstance(last, bool) or not isinstance(last, numbers.Integral) or not 1 <= last <= T:
        raise ValueError(f"{model}: last must be None or an int in [1, {T}] (the positions whose states are "
                         f"kept), got {last!r}")
    return int(last)


def _as_array(x, xp):
    data = x.data if isinstance(x, Tensor) else x
    if not (isinstance(data, np.ndarray) or backend.is_cupy_array(data)):
        data = np.asarray(data)
    return backend.to_device(data, "cuda" if xp is not np else "cpu")


class GPT(nn.Module):
    """GPT-2 language model. ``GPT(cfg, value_head=True)`` adds a per-token value head for PPO.

    ``model(ids, attention_mask=None, cache=None, return_values=False)`` → logits (B, T, V)
    [, values (B, T)]. Initialisation as GPT-2: weights N(0, 0.02), biases 0, and the
    residual projections (attn.c_proj, mlp.c_proj) N(0, 0.02/√(2·n_layer)) because each
    block adds two of them to the residual stream, drawn from the generator seeded by
    ``minirlhf.manual_seed``.
    """

    def __init__(self, config, value_head=False):
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT: config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.value_head = nn.Linear(config.n_embd, 1) if value_head else None
        _init_gpt2(self, config.n_layer)

    # ------------------------------------------------------------ forward
    def hidden(self, ids, attention_mask=None, cache=None, last=None):
        """Hidden states after the final LayerNorm, (B, T, C); with ``last``, those of the last ``last``
        positions alone, (B, last, C).

        ``last`` skips work no one reads: every block but the last still runs on every position (its
        outputs are the next block's keys and values), but in the last block only the kept positions'
        queries, attention, MLP and final LayerNorm run. Scoring a response of N tokens after a prompt
        of T needs the states of its last N + 1 positions or fewer (:func:`minirlhf.rollout.response_hidden`).
        """
        cfg = self.config
        xp = self.wte.weight.xp
        ids = _as_array(ids, xp)
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"GPT: ids must be a 2-d integer array (B, T), got shape {ids.shape} dtype {ids.dtype}")
        B, T = ids.shape
        past = cache.length if cache is not None else 0
        if ids.size == 0:
            raise ValueError(f"GPT: ids is empty (shape {ids.shape})")
        if past + T > cfg.block_size:
            raise ValueError(f"GPT: sequence length {past + T} (cached {past} + new {T}) exceeds "
                             f"block_size={cfg.block_size}")
        # on CuPy this check would cost a device→host sync every forward, so it runs on NumPy only
        if xp is np and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"GPT: ids must lie in [0, vocab_size={cfg.vocab_size}), got min {int(ids.min())} "
                             f"max {int(ids.max())}")
        if attention_mask is None:
            positions = xp.arange(past, past + T)[None, :]
            key_mask = None
        else:
            mask = _as_array(attention_mask, xp)
            if mask.shape != (B, past + T):
                raise ValueError(f"GPT: attention_mask must have shape (B, cached + T) = {(B, past + T)}, "
                                 f"got {mask.shape}")
            mask = mask != 0
            positions = xp.maximum(xp.cumsum(mask, axis=1) - 1, 0)[:, past:]
            key_mask = mask[:, None, None, :]  # (B, 1, 1, S): every head and query sees the same keys
        last = _check_last(last, T, "GPT")
        x = self.drop(self.wte(ids) + self.wpe(positions))
        for layer, block in enumerate(self.h):
            x = block(x, key_mask, cache, layer, last if layer == len(self.h) - 1 else None)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def forward(self, ids, attention_mask=None, cache=None, return_values=False):
        h = self.hidden(ids, attention_mask, cache)
        if not return_values:
            return self.lm_logits(h)
        return self.lm_logits(h), self.values(h)

    def lm_logits(self, h):
        """Next-token logits (..., V) from hidden states (..., C): the LM head, tied to the input embedding."""
        return F.linear(h, self.wte.weight)

    def values(self, h):
        """V(s_t) for each hidden state (B, T, C) → (B, T), from the value head.

        The head reads the states without sending gradient back into them: a critic that regresses
        noisy returns through the shared trunk drags the policy away from where it was.
        """
        if self.value_head is None:
            raise ValueError(f"{type(self).__name__}: V(s_t) needs a value head; build the model with value_head=True")
        B, T, _ = h.shape
        return self.value_head(h.detach()).reshape(B, T)

    def new_cache(self):
        """An empty KV cache for incremental decoding (up to block_size positions)."""
        return KVCache(self.config.n_layer, self.config.block_size)

    # --------------------------------------------------------- weights & files
    def copy(self):
        """An independent deep copy (weights and config), e.g. the frozen reference policy."""
        clone = copy.deepcopy(self)
        clone.zero_grad()
        return clone

    def config_dict(self):
        return {"architecture": type(self).__name__, **asdict(self.config),
                "value_head": self.value_head is not None}

    def save(self, directory):
        """Write config.json + model.safetensors into ``directory`` (atomically)."""
        from .checkpoint import save_checkpoint
        save_checkpoint(directory, self)

    @classmethod
    def load(cls, directory):
        """A model rebuilt from a directory written by :meth:`save` (the global RNG is left as it was)."""
        from .checkpoint import load_weights, read_config, rng_state, set_rng_state
        stored = read_config(directory)
        if stored.get("architecture") != cls.__name__:
            raise ValueError(f"{cls.__name__}.load: {directory} holds architecture "
                             f"{stored.get('architecture')!r}, expected {cls.__name__!r}")
        before = rng_state()  # building the model draws an init that the stored weights replace
        model = cls._from_config_dict(stored)
        set_rng_state(before)
        load_weights(directory, model)
        return model

    @classmethod
    def _from_config_dict(cls, stored):
        cfg = GPTConfig(**{f.name: stored[f.name] for f in fields(GPTConfig) if f.name in stored})
        return cls(cfg, value_head=bool(stored.get("value_head", False)))

    @classmethod
    def from_pretrained(cls, path):
        """Load a Hugging Face ``GPT2LMHeadModel`` directory (config.json + safetensors); see
        :func:`minirlhf.hf.load_hf_gpt2`."""
        from .hf import check_state, load_hf_gpt2
        settings, state = load_hf_gpt2(path)
        model = cls(GPTConfig(**settings))
        check_state(model, state, path)
        model.load_state_dict(state)
        return model


def _init_gpt2(module, n_layer):
    rng = backend.generator("cpu")
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            p.data = np.zeros(p.shape, dtype=p.dtype)
        elif ".ln_" in name or name.startswith("ln_"):
            p.data = np.ones(p.shape, dtype=p.dtype)
        else:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
            p.data = (rng.standard_normal(p.shape) * std).astype(p.dtype)


class RewardModel(nn.Module):
    """r(x, y): the GPT trunk, a score for each response token, and a head on the last token.

        r(x, y) = Σ_{t ∈ y} u[y_t] · h_{t−1}  +  w · h_last + b

    h_t is the trunk's hidden state at position t. The first term scores each response token
    from the state just before it, the state whose LM head predicted that token, through a
    (V, C) table u shaped like the embedding: a per-token decomposition of the sequence reward
    (Rafailov et al. 2024, "From r to Q*", write DPO's implicit reward as such a sum).
    It lets the model compare each token with what the trunk expects there. The second term is
    the usual scalar head on the last real token (Ouyang et al. 2022), which sees the whole
    response. A last-token head alone must check the answer again in its final layers, which a
    2-layer trunk does poorly: on the demo's pairs it stalled at 79% held-out pair accuracy after
    5,000 steps, where the per-token term reached 90% by 2,000 steps and 95% by 4,500 (the demo
    uses 2,500, with its cosine schedule ending there; starting u from the LM head, or a log-softmax
    form that starts at log π_SFT(y|x), did no better).

    ``rm(ids, attention_mask, response_mask)`` → (B,). ``response_mask`` (B, T) marks the
    response tokens (1) that the first term sums over; without it every real token after a
    row's first is summed. The last real token is the last position with attention_mask 1, so
    left and right padding both work.
    """

    trunk = GPT  # the language model whose hidden states are scored

    def __init__(self, config):
        self.config = config
        self.transformer = self.trunk(config)
        self.token_scores = nn.Embedding(config.vocab_size, config.n_embd)
        self.reward_head = nn.Linear(config.n_embd, 1)
        for head in (self.token_scores, self.reward_head):
            _init_gpt2(head, config.n_layer)

    def forward(self, ids, attention_mask=None, response_mask=None):
        h = self.transformer.hidden(ids, attention_mask)  # (B, T, C)
        B, T, _ = h.shape
        xp = h.xp
        ids = _as_array(ids, xp)
        if attention_mask is None:
            mask = xp.ones((B, T), dtype=bool)
        else:
            mask = _as_array(attention_mask, xp) != 0
            if not bool(mask.any(axis=1).all()):
                raise ValueError("RewardModel: every row of attention_mask needs at least one real token (a 1)")
        if response_mask is None:
            scored = mask & (xp.cumsum(mask, axis=1) > 1)
        else:
            scored = _as_array(response_mask, xp)
            if scored.shape != (B, T):
                raise ValueError(f"RewardModel: response_mask must have the shape of ids {(B, T)}, got "
                                 f"{scored.shape}")
            scored = (scored != 0) & mask
        last = T - 1 - xp.argmax(mask[:, ::-1], axis=1)
        return self.score(h[:, :-1], ids[:, 1:], scored[:, 1:], h[xp.arange(B), last])

    def score(self, h_before, tokens, scored, h_last):
        """r from the trunk's states: Σ_t scored_t · u[y_t] · h_{t−1} + w · h_last + b, (B,).

        h_before (B, N, C): the state before each token of ``tokens`` (B, N); scored (B, N): 1 on the
        tokens the first term sums over; h_last (B, C): the state on the last real token.
        """
        per_token = (self.token_scores(tokens) * h_before).sum(axis=-1)  # u[y_t] · h_{t−1}, (B, N)
        token_term = (per_token * h_before.xp.asarray(scored).astype(h_before.dtype)).sum(axis=1)
        return token_term + self.reward_head(h_last).reshape(h_last.shape[0])

    @classmethod
    def from_gpt(cls, gpt):
        """A reward model whose trunk starts from ``gpt``'s weights (e.g. the SFT policy)."""
        rm = cls(gpt.config)
        trunk = {k: v for k, v in gpt.state_dict().items() if not k.startswith("value_head.")}
        rm.transformer.load_state_dict(trunk)
        if gpt.wte.weight.device != "cpu":
            rm.to(gpt.wte.weight.device)
        return rm

    copy = GPT.copy
    save = GPT.save
    load = classmethod(GPT.load.__func__)

    def config_dict(self):
        return {"architecture": type(self).__name__, **asdict(self.config)}

    @classmethod
    def _from_config_dict(cls, stored):
        return cls(GPTConfig(**{f.name: stored[f.name] for f in fields(GPTConfig) if f.name in stored}))
