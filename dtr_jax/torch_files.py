"""Reading PyTorch's weight files without trusting them, for every module that reads one
(the DiT/DTR checkpoints, the SD VAE's weights, the FID Inception weights, exports).

`.pt` / `.pth` / `.bin`: torch is imported here only, when such a file is read: where it
is missing, the file is refused with the extra to install. Nothing in a file runs:
`torch.load(weights_only=True)`, with inert stand-ins for the classes torch does not
allow (a pickled OmegaConf config). `.safetensors`: read from its header into numpy
arrays, with neither torch nor the safetensors package.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
from etils import epath

from dtr_jax import files

TORCH_REQUIREMENT = "torch>=2.5"  # weights_only loading with safe_globals; setup.cfg's extra


class Inert:
    """Stands in for an object of a class a checkpoint's pickle names but that is never
    imported or run (the DTR release's OmegaConf config): keeps its pickled data only."""

    name = ""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<inert {self.name}>"


def read_torch(path: str):
    """torch.load(weights_only=True) of `path`, with inert stand-ins for the classes torch
    does not allow. Files of torch's zip format (the default since torch 1.6) are memory-
    mapped (tensors are read from disk when converted); older ones are read whole."""
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"is a PyTorch file: reading it needs torch ({TORCH_REQUIREMENT}: pip install "
            "'dtr_jax[pytorch]'), or convert it to .safetensors"
        ) from None
    if not _zip_format(path):  # the legacy format: no mmap, no globals scan
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any failure means the same to the user
            raise ValueError(
                "is not a PyTorch file: neither torch's zip format nor its legacy pickle "
                f"({type(e).__name__}: {_reason(e)})"
            ) from e
    try:
        with open(path, "rb") as f:
            foreign = torch.serialization.get_unsafe_globals_in_checkpoint(f)
        stand_ins = [(type("Inert", (Inert,), {"name": name}), name) for name in foreign]
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a foreign file fails in torch's reader in many ways, all "unreadable"
        raise ValueError(f"cannot be read with torch.load(weights_only=True): {_reason(e)}") from e


def _zip_format(path: str) -> bool:
    """Whether `path` starts as torch's zip format does (a truncated one still does)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _reason(error: Exception) -> str:
    """The line of a torch.load error that says why (torch wraps it in advice)."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((x for x in lines if not x.startswith(boilerplate)), type(error).__name__)


SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file as read-only numpy arrays (memory-mapped from a
    local file, read whole from an object store; bf16 as ml_dtypes' bfloat16). Raises
    ValueError saying what is wrong: a file cut short names its first incomplete tensor."""
    if files.is_remote(path):
        data = np.frombuffer(epath.Path(path).read_bytes(), np.uint8)
    else:
        data = np.memmap(path, np.uint8, "r") if os.path.getsize(path) else np.zeros(0, np.uint8)
    n = int.from_bytes(data[:8].tobytes(), "little")
    if len(data) < 8 or n > len(data) - 8:
        raise ValueError("is not a safetensors file, or its header is cut short")
    try:
        header = json.loads(data[8 : 8 + n].tobytes())
        header.pop("__metadata__", None)
        entries = sorted(
            (int(v["data_offsets"][0]), int(v["data_offsets"][1]), k, v["dtype"], tuple(v["shape"]))
            for k, v in header.items()
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"has an unreadable safetensors header: {e}") from None
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"has a malformed safetensors header ({e!r})") from None
    body, out = data[8 + n :], {}
    for start, end, key, dtype, shape in entries:
        if end > len(body):
            raise ValueError(
                f"is cut short: first incomplete tensor: {key!r} (ends at byte {8 + n + end} "
                f"of {len(data)})"
            )
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {key!r} has the unsupported dtype {dtype}")
        out[key] = body[start:end].view(SAFETENSORS_DTYPES[dtype]).reshape(shape)
    return out
