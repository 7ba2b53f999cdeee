import json
import os
import pickle
import struct

import numpy as np
import pytest

import minirlhf
import minirlhf.functional as F
from minirlhf import backend, checkpoint
from minirlhf.checkpoint import load_checkpoint, load_safetensors, save_checkpoint, save_safetensors
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.optim import AdamW

CFG = GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=64, block_size=32)


def arrays(rng):
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f64": rng.standard_normal(5),
        "f16": rng.standard_normal((2, 2)).astype(np.float16),
        "i64": rng.integers(-10**12, 10**12, (4,)),
        "i32": rng.integers(-1000, 1000, (2, 3)).astype(np.int32),
        "u8": rng.integers(0, 255, (7,)).astype(np.uint8),
        "bool": rng.random((2, 2)) > 0.5,
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k])


# ---------------------------------------------------------------- the format
def test_safetensors_round_trip_keeps_every_dtype_and_shape(tmp_path, rng):
    t = arrays(rng)
    save_safetensors(tmp_path / "a.safetensors", t)
    assert_same(t, load_safetensors(tmp_path / "a.safetensors"))


def test_header_layout_is_length_then_json_then_aligned_data(tmp_path):
    save_safetensors(tmp_path / "a.safetensors", {"x": np.arange(3, dtype=np.int32)}, metadata={"k": "v"})
    raw = (tmp_path / "a.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert n % 8 == 0
    assert header["x"] == {"dtype": "I32", "shape": [3], "data_offsets": [0, 12]}
    assert header["__metadata__"] == {"k": "v"}
    assert raw[8 + n:] == np.arange(3, dtype="<i4").tobytes()


def test_safetensors_package_reads_ours(tmp_path, rng):
    st = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open
    t = arrays(rng)
    save_safetensors(tmp_path / "a.safetensors", t, metadata={"format": "np", "note": "hi"})
    assert_same(t, st.load_file(str(tmp_path / "a.safetensors")))
    with safe_open(str(tmp_path / "a.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "np", "note": "hi"}


def test_we_read_the_safetensors_package_files(tmp_path, rng):
    st = pytest.importorskip("safetensors.numpy")
    t = arrays(rng)
    st.save_file(t, str(tmp_path / "theirs.safetensors"))
    assert_same(t, load_safetensors(tmp_path / "theirs.safetensors"))


def test_bf16_from_torch_reads_as_exact_float32(tmp_path):
    torch = pytest.importorskip("torch")
    save_file = pytest.importorskip("safetensors.torch").save_file
    x = torch.randn(4, 5).to(torch.bfloat16)
    save_file({"w": x}, str(tmp_path / "bf16.safetensors"))
    got = load_safetensors(tmp_path / "bf16.safetensors")["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x.float().numpy())


def test_big_endian_input_is_written_little_endian(tmp_path):
    x = np.arange(4, dtype=">f4")
    save_safetensors(tmp_path / "a.safetensors", {"x": x})
    got = load_safetensors(tmp_path / "a.safetensors")["x"]
    np.testing.assert_array_equal(got, np.arange(4, dtype=np.float32))


def _corrupt(tmp_path, header, data=b""):
    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_truncated_file_is_a_clear_error(tmp_path, rng):
    save_safetensors(tmp_path / "a.safetensors", {"x": rng.standard_normal(100).astype(np.float32)})
    raw = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="outside the 390 data bytes"):
        load_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(raw[:5])
    with pytest.raises(ValueError, match="too short"):
        load_safetensors(tmp_path / "tiny.safetensors")


def test_header_length_beyond_the_file_is_a_clear_error(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(ValueError, match="runs past the end"):
        load_safetensors(tmp_path / "a.safetensors")


def test_bad_json_is_a_clear_error(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_safetensors(tmp_path / "a.safetensors")


def test_unknown_dtype_is_a_clear_error(tmp_path):
    path = _corrupt(tmp_path, {"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(ValueError, match="unknown dtype 'C64'"):
        load_safetensors(path)


def test_offsets_that_disagree_with_the_shape_are_an_error(tmp_path):
    path = _corrupt(tmp_path, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 12)
    with pytest.raises(ValueError, match="needs 12"):
        load_safetensors(path)


def test_loading_never_unpickles(tmp_path, rng, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    minirlhf.manual_seed(0)
    model = GPT(CFG)
    model.save(tmp_path / "ck")
    GPT.load(tmp_path / "ck")


# ---------------------------------------------------------------- atomic writes
def test_crash_mid_save_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch):
    minirlhf.manual_seed(0)
    old = GPT(CFG)
    old.save(tmp_path / "ck")
    minirlhf.manual_seed(1)
    new = GPT(CFG)
    real_write = checkpoint._write_file

    def crash_on_weights(path, chunks):
        if str(path).endswith("model.safetensors"):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError("disk full")
        real_write(path, chunks)
    monkeypatch.setattr(checkpoint, "_write_file", crash_on_weights)
    with pytest.raises(OSError, match="disk full"):
        new.save(tmp_path / "ck")
    monkeypatch.undo()
    loaded = GPT.load(tmp_path / "ck")
    np.testing.assert_array_equal(loaded.wte.weight.data, old.wte.weight.data)
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # the half-written temporary folder is gone


def test_crash_mid_file_write_leaves_the_old_file(tmp_path):
    save_safetensors(tmp_path / "a.safetensors", {"x": np.ones(3, dtype=np.float32)})

    def chunks():
        yield b"half of a new file"
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        checkpoint._write_file(tmp_path / "a.safetensors", chunks())
    np.testing.assert_array_equal(load_safetensors(tmp_path / "a.safetensors")["x"], np.ones(3))
    assert os.listdir(tmp_path) == ["a.safetensors"]  # no temporary file left behind


def test_saving_over_a_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        GPT(CFG).save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- checkpoints
def test_save_and_load_restore_model_optimizer_step_extra_and_rng(tmp_path, rng):
    minirlhf.manual_seed(0)
    model = GPT(CFG, value_head=True)
    opt = AdamW(model.parameters(), lr=1e-3)
    ids = rng.integers(0, 64, (2, 8))
    F.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", model, opt, step=7, extra={"note": [1, 2]})
    after_save = backend.generator("cpu").random(3)

    minirlhf.manual_seed(99)
    fresh = GPT(CFG, value_head=True)
    fresh_opt = AdamW(fresh.parameters(), lr=5.0)
    step, extra = load_checkpoint(tmp_path / "ck", fresh, fresh_opt)
    assert (step, extra) == (7, {"note": [1, 2]})
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[k], v)
    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert a["step"] == b["step"] and a["lr"] == b["lr"]
    for k in a["buffers"]:
        np.testing.assert_array_equal(a["buffers"][k], b["buffers"][k])
    np.testing.assert_array_equal(backend.generator("cpu").random(3), after_save)


def test_loading_another_architecture_names_the_setting(tmp_path):
    GPT(CFG).save(tmp_path / "ck")
    other = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32))
    with pytest.raises(ValueError, match="n_head is 4 in the checkpoint but 2 in the model"):
        load_checkpoint(tmp_path / "ck", other)
    with pytest.raises(ValueError, match="value_head is False in the checkpoint but True"):
        load_checkpoint(tmp_path / "ck", GPT(CFG, value_head=True))
    with pytest.raises(ValueError, match="architecture 'GPT', expected 'RewardModel'"):
        RewardModel.load(tmp_path / "ck")


def test_reward_model_saves_and_loads(tmp_path, rng):
    rm = RewardModel(CFG)
    rm.save(tmp_path / "rm")
    ids = rng.integers(0, 64, (2, 5))
    np.testing.assert_array_equal(RewardModel.load(tmp_path / "rm")(ids).data, rm(ids).data)


def test_checkpoint_files_are_readable_by_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    model = GPT(CFG)
    model.save(tmp_path / "ck")
    theirs = st.load_file(str(tmp_path / "ck" / "model.safetensors"))
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(theirs[k], v)
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["n_layer"] == 2


def test_loading_a_model_leaves_the_global_rng_alone(tmp_path):
    GPT(CFG).save(tmp_path / "ck")
    minirlhf.manual_seed(5)
    want = backend.generator("cpu").random(3)
    minirlhf.manual_seed(5)
    GPT.load(tmp_path / "ck")
    np.testing.assert_array_equal(backend.generator("cpu").random(3), want)
