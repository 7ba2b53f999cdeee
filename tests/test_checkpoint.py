import contextlib
import json
import os
import pickle
import struct
import subprocess
import sys
import warnings

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


# ---------------------------------------------------------------- crash safety
class Crash(BaseException):
    """The process dies here: nothing after it touches the disk, no cleanup runs."""


class CrashAt:
    """Counts the filesystem operations of a save and dies at the k-th (None: never): after the
    crash every further operation raises without doing anything. A crash inside rmtree leaves it
    half done; a crash in a write leaves its temporary file."""

    OPS = [(os, "mkdir"), (os, "rename"), (os, "replace"), (os, "unlink"), (os, "remove"), (os, "fsync"),
           (checkpoint.tempfile, "mkstemp"), (checkpoint.shutil, "rmtree")]

    def __init__(self, monkeypatch, k):
        self.k, self.count, self.crashed = k, 0, False
        for module, name in self.OPS:
            monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name, real):
        def op(*args, **kwargs):
            if self.crashed:
                raise Crash(f"after the crash: {name}")
            if self.count == self.k:
                self.crashed = True
                if name == "rmtree":   # die half way through deleting the folder
                    for root, _, files in os.walk(args[0]):
                        if files:
                            os.unlink(os.path.join(root, files[0]))
                            break
                raise Crash(f"at {name} #{self.k}")
            self.count += 1
            return real(*args, **kwargs)
        return op


def _trained(seed):
    minirlhf.manual_seed(seed)
    model = GPT(CFG)
    opt = AdamW(model.parameters(), lr=1e-3)
    ids = np.random.default_rng(seed).integers(0, 64, (2, 6))
    F.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).backward()
    opt.step()
    return model, opt


def _which(directory, candidates):
    """Load the checkpoint at ``directory``; return the step of the candidate it equals, exactly."""
    model, opt = _trained(99)
    with _record_warnings() as messages:
        step, extra = load_checkpoint(directory, model, opt)
    want_model, want_opt = candidates[step]
    for k, v in want_model.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[k], v, err_msg=k)
    for k, v in want_opt.state_dict()["buffers"].items():
        np.testing.assert_array_equal(opt.state_dict()["buffers"][k], v, err_msg=k)
    assert extra == {"of": step}
    return step, [str(m.message) for m in messages]


@contextlib.contextmanager
def _record_warnings():
    with warnings.catch_warnings(record=True) as messages:
        warnings.simplefilter("always")
        yield messages


def _save_with_crash(monkeypatch, k, directory, model, opt, step):
    """True if the save finished, False if it died at operation k."""
    with monkeypatch.context() as m:
        CrashAt(m, k)
        try:
            save_checkpoint(directory, model, opt, step=step, extra={"of": step})
            return True
        except Crash:
            return False


def _count_ops(monkeypatch, directory, model, opt, step):
    with monkeypatch.context() as m:
        counter = CrashAt(m, None)
        save_checkpoint(directory, model, opt, step=step, extra={"of": step})
    return counter.count


def test_a_crash_at_any_point_of_a_save_leaves_the_old_or_the_new_checkpoint_and_load_says_which(
        tmp_path, monkeypatch):
    """A kill between the two renames of the directory swap left neither checkpoint at the path."""
    old, new, later = _trained(1), _trained(2), _trained(3)
    candidates = {1: old, 2: new, 3: later}
    n = _count_ops(monkeypatch, tmp_path / "probe", *old, 1)
    n = _count_ops(monkeypatch, tmp_path / "probe", *new, 2)  # a save over an existing checkpoint
    assert n >= 8
    seen = set()
    for k in range(n + 1):
        directory = tmp_path / f"run{k}" / "ck"
        save_checkpoint(directory, *old, step=1, extra={"of": 1})
        finished = _save_with_crash(monkeypatch, k, directory, *new, 2)
        assert finished == (k == n)
        step, messages = _which(directory, candidates)
        seen.add(step)
        if messages:
            assert len(messages) == 1 and f"{os.path.realpath(directory)} holds the" in messages[0]
            assert ("new checkpoint (step 2)" if step == 2 else "previous checkpoint (step 1)") in messages[0]
        assert sorted(os.listdir(directory.parent)) == ["ck"], "load leaves one complete checkpoint behind"
        save_checkpoint(directory, *later, step=3, extra={"of": 3})
        assert _which(directory, candidates) == (3, [])
        assert sorted(os.listdir(directory.parent)) == ["ck"]
    assert seen == {1, 2}


def test_a_crash_during_the_first_save_leaves_no_checkpoint_or_the_new_one(tmp_path, monkeypatch):
    model, opt = _trained(1)
    n = _count_ops(monkeypatch, tmp_path / "probe", model, opt, 1)
    for k in range(n):
        directory = tmp_path / f"run{k}" / "ck"
        assert not _save_with_crash(monkeypatch, k, directory, model, opt, 1)
        if os.path.exists(directory):
            assert _which(directory, {1: (model, opt)})[0] == 1
        else:
            with pytest.raises(FileNotFoundError, match="no config.json"), _record_warnings():
                load_checkpoint(directory, GPT(CFG))
        save_checkpoint(directory, model, opt, step=1, extra={"of": 1})
        assert _which(directory, {1: (model, opt)}) == (1, [])
        assert sorted(os.listdir(directory.parent)) == ["ck"]


def test_saving_into_a_symlink_to_a_folder_saves_into_the_folder_and_keeps_the_link(tmp_path):
    """It half-completed (the link was renamed away, rmtree refused the link) and raised."""
    target = tmp_path / "real"
    old, new = _trained(1), _trained(2)
    save_checkpoint(target, *old, step=1, extra={"of": 1})
    os.symlink(target, tmp_path / "link")
    save_checkpoint(tmp_path / "link", *new, step=2, extra={"of": 2})
    assert os.path.islink(tmp_path / "link") and os.readlink(tmp_path / "link") == str(target)
    assert _which(tmp_path / "link", {2: new})[0] == 2
    assert _which(target, {2: new})[0] == 2
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]
    os.symlink(tmp_path / "fresh", tmp_path / "dangling")
    save_checkpoint(tmp_path / "dangling", *old, step=1, extra={"of": 1})
    assert _which(tmp_path / "fresh", {1: old})[0] == 1


def test_a_model_file_linked_to_dev_zero_is_refused_without_reading_it(tmp_path):
    """It was read until memory ran out: the load runs in a child with 2 GiB of address space and 60 s."""
    if not os.path.exists("/dev/zero"):
        pytest.skip("needs /dev/zero")
    GPT(CFG).save(tmp_path / "ck")
    os.remove(tmp_path / "ck" / "model.safetensors")
    os.symlink("/dev/zero", tmp_path / "ck" / "model.safetensors")
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
            "from minirlhf.model import GPT\n"
            f"GPT.load({str(tmp_path / 'ck')!r})\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": root})
    assert "model.safetensors is not a regular file" in done.stderr, done.stderr[-2000:]


def test_tensor_sizes_are_checked_against_the_file_length_before_reading(tmp_path):
    path = tmp_path / "big.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(ValueError, match=r"data_offsets \[0, 4000000000\] lie outside the 16 data bytes"):
        load_safetensors(path)


def test_tampered_tensor_names_in_optimizer_safetensors_are_a_clear_error(tmp_path):
    model, opt = _trained(1)
    save_checkpoint(tmp_path / "ck", model, opt, step=1)
    path = tmp_path / "ck" / "optimizer.safetensors"
    for bad in ("x.m", "999.m", "0.velocity", "m"):
        buffers = load_safetensors(path)
        buffers[bad] = buffers.pop("0.m")
        save_safetensors(path, buffers)
        fresh, fresh_opt = _trained(2)
        with pytest.raises(ValueError, match=rf"optimizer.safetensors: load_state_dict: buffer name '{bad}' is not "
                                             r"'<parameter index>.<buffer>'"):
            load_checkpoint(tmp_path / "ck", fresh, fresh_opt)
        assert fresh_opt.state_dict()["buffers"].keys() == _trained(2)[1].state_dict()["buffers"].keys()
        save_checkpoint(tmp_path / "ck", model, opt, step=1)


@pytest.mark.parametrize("name, content, message", [
    ("config.json", "[1, 2]", r"config.json: expected a JSON object, got list"),
    ("config.json", "{", r"config.json is not valid JSON"),
    ("trainer_state.json", "", r"trainer_state.json is not valid JSON"),
])
def test_corrupted_json_files_of_a_checkpoint_are_named(tmp_path, name, content, message):
    model, opt = _trained(1)
    save_checkpoint(tmp_path / "ck", model, opt, step=1)
    (tmp_path / "ck" / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path / "ck", *_trained(2))
