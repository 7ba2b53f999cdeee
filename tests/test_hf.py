"""Hugging Face directories: bf16 / fp16 weights bit-exact, sharded equal to single-file, and every way a
directory can be wrong (unknown architecture, unsupported setting, missing, truncated or mismatched shard)
refused by name before a model exists."""
import json
import os

import numpy as np
import pytest

from minirlhf import hf, no_grad
from minirlhf.pretrained import from_pretrained
from minirlhf.llama import Llama
from minirlhf.model import GPT
from hf_models import VOCAB, hf_model, saved

torch = pytest.importorskip("torch")


def edit_config(path, **changes):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    config.update(changes)
    with open(file, "w") as f:
        json.dump(config, f)


# ------------------------------------------------------------ dtypes
@pytest.mark.parametrize("torch_dtype", ["bfloat16", "float16"])
def test_half_precision_weights_widen_bit_exactly(tmp_path, torch_dtype):
    model = hf_model("llama").to(getattr(torch, torch_dtype))
    model.save_pretrained(tmp_path)
    ours = Llama.from_pretrained(tmp_path)
    theirs = {n.removeprefix("model."): p.detach().float().numpy() for n, p in model.named_parameters()}
    for name, p in ours.named_parameters():
        assert p.dtype == np.float32
        np.testing.assert_array_equal(p.data, theirs[name], err_msg=name)


def test_bf16_bits_are_the_top_half_of_the_float32(tmp_path):
    model = hf_model("qwen2").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ours = Llama.from_pretrained(tmp_path, dtype=np.float64)
    weight = ours.embed_tokens.weight.data
    bits = model.model.embed_tokens.weight.detach().view(torch.int16).numpy().astype(np.uint16)
    assert weight.dtype == np.float64
    np.testing.assert_array_equal(weight.astype(np.float32).view(np.uint32) >> 16, bits)
    assert not np.any(weight.astype(np.float32).view(np.uint32) & 0xFFFF)


# ------------------------------------------------------------ shards
def test_sharded_loading_equals_single_file_loading(tmp_path):
    saved("qwen3", tmp_path / "single")
    saved("qwen3", tmp_path / "sharded", max_shard_size="40KB")
    shards = [f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.exists(tmp_path / "sharded" / hf.INDEX_FILE)
    single, sharded = Llama.from_pretrained(tmp_path / "single"), Llama.from_pretrained(tmp_path / "sharded")
    a, b = single.state_dict(), sharded.state_dict()
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture
def sharded(tmp_path):
    _, path = saved("llama", tmp_path, max_shard_size="40KB")
    with open(path / hf.INDEX_FILE) as f:
        index = json.load(f)
    return path, index


def test_a_truncated_shard_is_named(sharded):
    path, index = sharded
    shard = sorted(set(index["weight_map"].values()))[1]
    size = os.path.getsize(path / shard)
    with open(path / shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ValueError, match=f"shard {shard} cannot be read: .*truncated"):
        Llama.from_pretrained(path)


def test_a_missing_shard_is_named(sharded):
    path, index = sharded
    shard = sorted(set(index["weight_map"].values()))[0]
    os.remove(path / shard)
    with pytest.raises(FileNotFoundError, match=f"lists shard {shard}, which is missing"):
        Llama.from_pretrained(path)


def test_a_shard_that_does_not_hold_what_the_index_says_is_named(sharded):
    path, index = sharded
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]
    with open(path / hf.INDEX_FILE, "w") as f:
        json.dump(index, f)
    says = f"does not hold what {hf.INDEX_FILE} says: missing \\[\\], unlisted \\['{name}'\\]"
    with pytest.raises(ValueError, match=says):
        Llama.from_pretrained(path)


def test_weights_that_do_not_fit_the_config_are_refused_before_any_is_loaded(tmp_path):
    _, path = saved("llama", tmp_path)
    edit_config(path, intermediate_size=64)
    with pytest.raises(ValueError, match=r"wrong shapes \[.*mlp.gate_proj.weight: \(80, 48\) in the file, "
                                         r"\(64, 48\) in the model"):
        Llama.from_pretrained(path)


def test_pickled_weights_are_never_loaded(tmp_path):
    _, path = saved("llama", tmp_path)
    os.remove(path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin files are never loaded"):
        Llama.from_pretrained(path)


# ------------------------------------------------------------ settings
@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["MistralForCausalLM"]), "holds a MistralForCausalLM; supported architectures"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'; this model implements only hidden_act='silu'"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(quantization_config={"quant_method": "awq", "bits": 4}), "quantization_config='awq'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}), "rope_type='yarn'"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16, "beta": 2.0}),
     r"rope_scaling has settings this model does not implement: \['beta'\]"),
])
def test_unsupported_llama_settings_are_refused_by_name(tmp_path, changes, message):
    _, path = saved("llama", tmp_path)
    edit_config(path, **changes)
    with pytest.raises(ValueError, match=message):
        Llama.from_pretrained(path)


def test_sliding_window_attention_is_refused_by_name(tmp_path):
    _, path = saved("qwen2", tmp_path)
    edit_config(path, use_sliding_window=True)
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        Llama.from_pretrained(path)
    edit_config(path, use_sliding_window=False, layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(ValueError, match=r"layer_types=\['full_attention', 'sliding_attention'\]"):
        Llama.from_pretrained(path)


def test_transformers_4_configs_with_rope_theta_and_rope_scaling_load_the_same(tmp_path):
    _, path = saved("llama", tmp_path)
    before = Llama.from_pretrained(path)
    with open(path / "config.json") as f:
        config = json.load(f)
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    with open(path / "config.json", "w") as f:
        json.dump(config, f)
    assert Llama.from_pretrained(path).config == before.config


def test_from_pretrained_picks_the_model_of_the_architecture(tmp_path, rng):
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB,
                                                                n_positions=16))
    gpt2.save_pretrained(tmp_path / "gpt2")
    qwen, _ = saved("qwen2", tmp_path / "qwen2")
    assert type(from_pretrained(tmp_path / "gpt2")) is GPT
    model = from_pretrained(tmp_path / "qwen2", dtype=np.float64)
    assert type(model) is Llama and model.embed_tokens.weight.dtype == np.float64
    ids = rng.integers(0, VOCAB, (1, 6))
    with torch.no_grad(), no_grad():
        np.testing.assert_allclose(model(ids).data, qwen.double()(torch.from_numpy(ids)).logits.numpy(), atol=2e-5)
    with pytest.raises(ValueError, match="dtype must be float32 or float64, got float16"):
        from_pretrained(tmp_path / "qwen2", dtype=np.float16)


def test_a_directory_without_config_json_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        from_pretrained(tmp_path)
