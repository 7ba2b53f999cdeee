"""Checkpoints on disk: the safetensors format written with NumPy alone, atomic writes, no pickle.

A safetensors file is

    8 bytes     N, the header length (unsigned 64-bit little-endian)
    N bytes     JSON: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
                       "__metadata__": {str: str}}   (optional metadata; padded with spaces)
    the rest    raw little-endian arrays, each at [begin, end) counted from the end of the header

so loading reads bytes and never executes code. A checkpoint directory holds

    config.json            the model's settings (architecture, n_layer, ...)
    model.safetensors      the parameters, by their dotted names
    optimizer.safetensors  the optimizer's buffers (AdamW's m and v), if an optimizer was saved
    trainer_state.json     step, optimizer step and lr, the global RNG state, and the caller's ``extra``

Every file goes to a temporary name in its own folder, is fsync'ed, then renamed into
place. A directory X is written whole as ``.X.new`` beside it and swapped in by two
renames, X → ``.X.old`` and ``.X.new`` → X, after which ``.X.old`` is deleted. A crash
at any point leaves X holding the previous or the new checkpoint, complete: ``.X.old``
exists only once ``.X.new`` is complete, so a crash between the two renames is finished
by the next save or load (see :func:`finish_interrupted_save`), which also says which
checkpoint X holds. Two processes must not save to the same X at once.
"""
import json
import math
import os
import shutil
import stat
import struct
import tempfile
import warnings

import numpy as np

from . import backend

DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
          "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
BF16 = "BF16"  # read only: bfloat16 is the top half of a float32, so it upcasts exactly
CODES = {dt: code for code, dt in DTYPES.items()}

CHECKPOINT_FILES = ("config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json")
# settings that may differ between a checkpoint and the model it loads into
RUNTIME_SETTINGS = ("dropout",)


# ------------------------------------------------------------ safetensors
def save_safetensors(path, tensors, metadata=None):
    """Write ``tensors`` (name → array, numpy or cupy) to ``path`` in the safetensors format, atomically."""
    header, arrays, offset = {}, [], 0
    for name, arr in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"save_safetensors: tensor names must be strings other than '__metadata__', got {name!r}")
        arr = backend.to_numpy(backend.array_of(arr))
        code = CODES.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
        if code is None:
            raise TypeError(f"save_safetensors: {name} has dtype {arr.dtype}; supported: "
                            f"{sorted(str(d) for d in CODES)}")
        arr = np.asarray(arr, dtype=DTYPES[code], order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        arrays.append(arr)
        offset += arr.nbytes
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("save_safetensors: metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the arrays start 8-byte aligned, as the safetensors library writes them
    _write_file(path, [struct.pack("<Q", len(raw)), raw] + [a.reshape(-1).view(np.uint8) for a in arrays])


def load_safetensors(path):
    """Read a safetensors file into name → numpy array (BF16 comes back as float32).

    Sizes are checked against the file's length before anything is read, and only regular
    files are read (a link to /dev/zero would otherwise be read until memory runs out)."""
    with open(path, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"load_safetensors: {path} is not a regular file (a device, pipe or socket); "
                             "expected a safetensors file")
        size = info.st_size
        if size < 8:
            raise ValueError(f"load_safetensors: {path} is {size} bytes, too short for the 8-byte header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise ValueError(f"load_safetensors: {path}: header length {n} runs past the end of the file "
                             f"({size} bytes); the file is truncated or not safetensors")
        raw_header = f.read(n)
        try:
            header = json.loads(raw_header.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"load_safetensors: {path}: the header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"load_safetensors: {path}: the header must be a JSON object, got "
                             f"{type(header).__name__}")
        data = memoryview(f.read(size - 8 - n))
    if len(data) != size - 8 - n:
        raise ValueError(f"load_safetensors: {path} changed while it was read (expected {size} bytes)")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        out[name] = _read_tensor(path, name, entry, data)
    return out


def _read_tensor(path, name, info, data):
    where = f"load_safetensors: {path}: tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise ValueError(f"{where}: expected an entry with dtype, shape and data_offsets, got {info!r}")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if code != BF16 and code not in DTYPES:
        raise ValueError(f"{where}: unknown dtype {code!r}; supported: {sorted(DTYPES) + [BF16]}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ValueError(f"{where}: data_offsets must be [begin, end], got {offsets!r}")
    begin, end = offsets
    itemsize = 2 if code == BF16 else DTYPES[code].itemsize
    if not 0 <= begin <= end <= len(data):
        raise ValueError(f"{where}: data_offsets {offsets} lie outside the {len(data)} data bytes "
                         "(truncated or corrupted file)")
    if end - begin != math.prod(shape) * itemsize:
        raise ValueError(f"{where}: data_offsets span {end - begin} bytes, but shape {shape} of {code} "
                         f"needs {math.prod(shape) * itemsize}")
    raw = data[begin:end]
    if code == BF16:
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(tuple(shape))
    dt = DTYPES[code]
    return np.frombuffer(raw, dtype=dt).astype(dt.newbyteorder("="), copy=True).reshape(tuple(shape))


# ------------------------------------------------------------ atomic writes
def _write_file(path, chunks):
    """Write ``chunks`` (bytes-like) to a temporary file beside ``path``, fsync, and rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _write_json(path, obj):
    _write_file(path, [json.dumps(obj, indent=2).encode()])


def _fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_names(directory):
    parent, name = os.path.split(directory)
    return os.path.join(parent, f".{name}.new"), os.path.join(parent, f".{name}.old")


def _saved_step(directory):
    try:
        with open(os.path.join(directory, "trainer_state.json")) as f:
            return f" (step {json.load(f)['step']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def finish_interrupted_save(directory):
    """Bring ``directory`` back to one complete checkpoint after a save that crashed, and say which
    one it holds: a message (also issued as a warning), or None if no save was interrupted.

    Crashed between the two renames (X missing, ``.X.old`` and ``.X.new`` present): ``.X.new`` is
    complete, so it becomes X. Crashed after them: ``.X.old`` is deleted, X is the new checkpoint.
    Crashed while ``.X.new`` was written: it is deleted, X is still the previous checkpoint.
    """
    directory = os.path.realpath(directory)
    new, old = _swap_names(directory)
    message = None
    if not os.path.lexists(directory) and os.path.isdir(old):
        if os.path.isdir(new):
            os.rename(new, directory)
            message = f"holds the new checkpoint{_saved_step(directory)}: a save interrupted between its renames " \
                      "was completed"
        else:
            os.rename(old, directory)
            message = f"holds the previous checkpoint{_saved_step(directory)}: an interrupted save was undone"
        _fsync_dir(os.path.dirname(directory))
    elif os.path.isdir(new):
        shutil.rmtree(new)
        message = (f"holds the previous checkpoint{_saved_step(directory)}: an unfinished save was discarded"
                   if os.path.isdir(directory) else "holds no checkpoint: an unfinished first save was discarded")
    if os.path.isdir(old):
        shutil.rmtree(old)
        message = message or f"holds the new checkpoint{_saved_step(directory)}: the previous one, left by an " \
                             "interrupted save, was deleted"
    if message is not None:
        message = f"{directory} {message}"
        warnings.warn(message, stacklevel=2)
    return message


def _replace_dir(directory, write_into):
    """Call ``write_into(folder)`` on a fresh ``.X.new`` beside ``directory`` X, then swap it in for X.

    A ``directory`` that is a symlink to a folder is saved into its target (the link stays)."""
    directory = os.path.realpath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    finish_interrupted_save(directory)
    if os.path.exists(directory):
        if not os.path.isdir(directory):
            raise ValueError(f"save_checkpoint: {directory} exists and is not a directory")
        foreign = sorted(set(os.listdir(directory)) - set(CHECKPOINT_FILES))
        if foreign:
            raise ValueError(f"save_checkpoint: {directory} holds files that are not part of a checkpoint "
                             f"({foreign}); a checkpoint replaces its whole directory, so pick an empty one")
    new, old = _swap_names(directory)
    os.mkdir(new)
    try:
        write_into(new)
        _fsync_dir(new)
    except Exception:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if os.path.exists(directory):
        os.rename(directory, old)   # from here until the next rename, X is missing: finish_interrupted_save
        os.rename(new, directory)
        _fsync_dir(parent)
        shutil.rmtree(old)
    else:
        os.rename(new, directory)
    _fsync_dir(parent)


# ------------------------------------------------------------ checkpoints
def rng_state():
    """The global CPU generator's state (dropout, default init) as JSON-ready data."""
    return backend.generator("cpu").bit_generator.state


def set_rng_state(state):
    backend.generator("cpu").bit_generator.state = state


def save_checkpoint(directory, model, optimizer=None, step=0, extra=None):
    """Save model weights, optimizer buffers, step, RNG state and ``extra`` (JSON-ready) to ``directory``.

    The global CUDA generator's state is not saved: dropout on the GPU does not resume bit-exactly.
    """
    config = model.config_dict() if hasattr(model, "config_dict") else {}
    state = {"step": int(step), "extra": extra if extra is not None else {}, "rng": rng_state(), "optimizer": None}
    if optimizer is not None:
        opt = optimizer.state_dict()
        state["optimizer"] = {"step": int(opt["step"]), "lr": [float(lr) for lr in opt["lr"]]}
    try:
        json.dumps(state)
    except TypeError as e:
        raise TypeError(f"save_checkpoint: extra must be JSON-serialisable ({e})") from None

    def write_into(tmp):
        _write_json(os.path.join(tmp, "config.json"), config)
        save_safetensors(os.path.join(tmp, "model.safetensors"), model.state_dict(), {"format": "np"})
        if optimizer is not None:
            save_safetensors(os.path.join(tmp, "optimizer.safetensors"), opt["buffers"])
        _write_json(os.path.join(tmp, "trainer_state.json"), state)
    _replace_dir(directory, write_into)


def _read_json(path, expected=dict):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, expected):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_config(directory):
    """config.json of the checkpoint in ``directory`` (after finishing a save that was interrupted)."""
    finish_interrupted_save(directory)
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is not a checkpoint: it has no config.json")
    return _read_json(path)


def load_weights(directory, model):
    """Load model.safetensors into ``model`` after checking that config.json describes the same architecture."""
    stored = read_config(directory)
    own = model.config_dict() if hasattr(model, "config_dict") else {}
    for key in sorted(set(stored) | set(own)):
        if key not in RUNTIME_SETTINGS and stored.get(key) != own.get(key):
            raise ValueError(f"checkpoint {directory} does not fit the model: {key} is {stored.get(key)!r} in "
                             f"the checkpoint but {own.get(key)!r} in the model")
    model.load_state_dict(load_safetensors(os.path.join(directory, "model.safetensors")))
    return model


def load_checkpoint(directory, model, optimizer=None):
    """Restore what :func:`save_checkpoint` wrote into ``model`` (and ``optimizer``); returns (step, extra).

    Also restores the global CPU RNG, so a resumed run draws the same dropout masks.
    """
    load_weights(directory, model)
    path = os.path.join(directory, "trainer_state.json")
    state = {"step": 0, "extra": {}, "rng": None, "optimizer": None}
    if os.path.exists(path):
        state.update(_read_json(path))
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"load_checkpoint: {directory} was saved without an optimizer; "
                             "call load_checkpoint(directory, model) without one")
        buffers_path = os.path.join(directory, "optimizer.safetensors")
        try:
            optimizer.load_state_dict({"step": state["optimizer"]["step"], "buffers": load_safetensors(buffers_path),
                                       "lr": state["optimizer"]["lr"]})
        except ValueError as e:
            raise ValueError(f"load_checkpoint: {buffers_path}: {e}") from None
    if state["rng"] is not None:
        set_rng_state(state["rng"])
    return state["step"], state["extra"]
