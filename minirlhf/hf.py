"""Hugging Face checkpoint directories → our configs and state dicts, read with NumPy alone.

A directory written by ``save_pretrained`` (or downloaded by the user) holds

    config.json                        the architecture ("architectures": ["Qwen2ForCausalLM"]) and its sizes
    model.safetensors                  the weights, or, for large models, shards
    model-00001-of-00002.safetensors   ... listed by
    model.safetensors.index.json       {"weight_map": {tensor name: shard file}}

Weights are read with :func:`minirlhf.checkpoint.load_safetensors` (no pickle, no torch): bf16
widens to float32 exactly (a bf16 is the top 16 bits of a float32), fp16 too, then everything is
cast to the float32 or float64 the caller asks for. Every shard is read and checked against the
index before a model is built, so a missing, truncated or mismatched shard is an error that names
it, never a half-loaded model. Settings a model here does not implement are refused by name.

Supported: ``GPT2LMHeadModel`` (:class:`~minirlhf.model.GPT`) and ``LlamaForCausalLM``,
``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` (:class:`~minirlhf.llama.Llama`). Nothing is downloaded.
"""
import json
import os

import numpy as np

from .checkpoint import load_safetensors

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
LLAMA_FAMILY = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
GPT2 = "GPT2LMHeadModel"
DTYPES = (np.float32, np.float64)


def read_hf_config(path):
    """config.json of a Hugging Face model directory, as a dict."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"from_pretrained: {path} has no config.json; expected a Hugging Face model "
                                "directory (config.json and model.safetensors)")
    with open(file) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"from_pretrained: {file} is not valid JSON ({e})") from None


def architecture(hf, path):
    """The one architecture named by config.json (``architectures``, else ``model_type``)."""
    names = hf.get("architectures")
    if names is None:
        by_type = {"gpt2": GPT2, **{t: a for a, t in LLAMA_FAMILY.items()}}
        if hf.get("model_type") not in by_type:
            raise ValueError(f"from_pretrained: {path}/config.json names no architecture and model_type "
                             f"{hf.get('model_type')!r} is none of {sorted(by_type)}")
        return by_type[hf["model_type"]]
    if not isinstance(names, list) or len(names) != 1:
        raise ValueError(f"from_pretrained: {path}/config.json has architectures={names!r}; expected one of "
                         f"{[GPT2, *LLAMA_FAMILY]}")
    if names[0] not in (GPT2, *LLAMA_FAMILY):
        raise ValueError(f"from_pretrained: {path} holds a {names[0]}; supported architectures are "
                         f"{[GPT2, *LLAMA_FAMILY]}")
    return names[0]


def read_hf_weights(path, dtype=np.float32):
    """name → array (``dtype``) of every tensor in model.safetensors or in the shards of its index."""
    if np.dtype(dtype).type not in DTYPES:
        raise ValueError(f"from_pretrained: dtype must be float32 or float64, got {np.dtype(dtype)}")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f).get("weight_map")
            except json.JSONDecodeError as e:
                raise ValueError(f"from_pretrained: {index} is not valid JSON ({e})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"from_pretrained: {index} has no weight_map of tensor name → shard file")
        shards = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, set()).add(name)
    elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
        shards = {SINGLE_FILE: None}
    else:
        raise FileNotFoundError(f"from_pretrained: {path} has neither {SINGLE_FILE} nor {INDEX_FILE} (pickled "
                                "pytorch_model.bin files are never loaded; re-save with save_pretrained(...))")
    state = {}
    for shard, names in sorted(shards.items()):
        file = os.path.join(path, shard)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"from_pretrained: {INDEX_FILE} lists shard {shard}, which is missing from {path}")
        try:
            tensors = load_safetensors(file)
        except ValueError as e:
            raise ValueError(f"from_pretrained: shard {shard} cannot be read: {e}") from None
        if names is not None and set(tensors) != names:
            extra, missing = sorted(set(tensors) - names), sorted(names - set(tensors))
            raise ValueError(f"from_pretrained: shard {shard} does not hold what {INDEX_FILE} says: "
                             f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                             f"unlisted {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        for name, arr in tensors.items():
            if arr.dtype.kind != "f":
                raise ValueError(f"from_pretrained: {shard}: tensor {name} has dtype {arr.dtype}; "
                                 "expected floating-point weights")
            state[name] = arr.astype(dtype, copy=False)
    return state


def check_state(model, state, path):
    """Every parameter of ``model`` present in ``state`` with its shape, and nothing else, before any is copied."""
    own = dict(model.named_parameters())
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{n}: {tuple(state[n].shape)} in the file, {own[n].shape} in the model"
             for n in own if n in state and tuple(state[n].shape) != own[n].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"from_pretrained: the weights in {path} do not fit config.json: missing {missing}, "
                         f"unexpected {unexpected}, wrong shapes {wrong}")


# ------------------------------------------------------------ GPT-2
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_hf_gpt2(path):
    """(GPTConfig settings, state dict) from a ``transformers`` GPT2LMHeadModel directory.

    Dropout is set to 0: RLHF compares log-probs across forward passes, which dropout would
    make noisy. Settings this GPT does not implement are refused by name. HF's GPT-2 stores its
    projections as Conv1D with weights (in, out); ours are Linear (out, in), so those four
    matrices per block are transposed.
    """
    hf = read_hf_config(path)
    expected = {"model_type": "gpt2", "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "tie_word_embeddings": True}
    for key, want in expected.items():
        if hf.get(key, want) != want:
            raise ValueError(f"from_pretrained: {path} has {key}={hf[key]!r}; this GPT supports only {want!r}")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"from_pretrained: {path} has activation_function={hf['activation_function']!r}; "
                         "this GPT uses the tanh GELU ('gelu_new')")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"from_pretrained: {path} has n_inner={hf['n_inner']}; this GPT uses 4 * n_embd "
                         f"= {4 * hf['n_embd']}")
    cfg = dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
               vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", hf.get("n_ctx")),
               dropout=0.0, layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    state = {}
    for name, arr in read_hf_weights(path).items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # causal-mask buffers, and the LM head that is tied to wte
        state[name] = np.ascontiguousarray(arr.T) if name.endswith(_CONV1D) else arr
    return cfg, state


# ------------------------------------------------------------ Llama, Qwen2, Qwen3
def llama_settings(hf, path):
    """LlamaConfig's settings from a LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM config.json."""
    arch = architecture(hf, path)
    if arch not in LLAMA_FAMILY:
        raise ValueError(f"from_pretrained: {path} holds a {arch}, not one of {list(LLAMA_FAMILY)}")
    family = LLAMA_FAMILY[arch]

    def refuse(key, value, why):
        raise ValueError(f"from_pretrained: {path} has {key}={value!r}; {why}")

    for key, ok in (("hidden_act", "silu"), ("mlp_bias", False), ("attention_dropout", 0.0),
                    ("partial_rotary_factor", 1.0), ("use_sliding_window", False)):
        if key in hf and hf[key] != ok and hf[key] is not None:
            refuse(key, hf[key], f"this model implements only {key}={ok!r}")
    if hf.get("quantization_config"):
        refuse("quantization_config", hf["quantization_config"].get("quant_method", "?"),
               "quantised weights are not supported; use the unquantised (bf16/fp16/fp32) checkpoint")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        refuse("layer_types", sorted(set(layer_types)), "this model implements only full causal attention")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})  # transformers 5, then 4
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type == "default":
        scaling = None
    elif rope_type == "llama3":
        scaling = {"rope_type": "llama3", **{k: rope[k] for k in rope if k != "attention_factor"}}
    else:
        refuse("rope_type", rope_type, "this model implements RoPE without scaling ('default') and Llama 3.1's "
               "'llama3' scaling")
    if family == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
    n_head = hf["num_attention_heads"]
    return dict(n_layer=hf["num_hidden_layers"], n_head=n_head,
                n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                block_size=hf.get("max_position_embeddings", 2048),
                head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
                qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=family == "qwen3",
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))


def load_hf_llama(path, dtype=np.float32):
    """(LlamaConfig settings, state dict in ``dtype``) from a Llama / Qwen2 / Qwen3 directory.

    HF's names lose their leading ``model.``; a tied checkpoint's lm_head.weight (if saved) and the
    rotary ``inv_freq`` buffers of old checkpoints are dropped (the embedding and the config say them).
    """
    cfg = llama_settings(read_hf_config(path), path)
    state = {}
    for name, arr in read_hf_weights(path, dtype).items():
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg["tie_word_embeddings"]):
            continue
        state[name.removeprefix("model.")] = arr
    return cfg, state
