"""Reading PyTorch `.pt` / `.pth` / `.bin` files without trusting them, for every module
that reads one (the DiT/DTR checkpoints, the SD VAE's `.bin`, the FID Inception weights).

torch is imported here only, when such a file is read: where it is missing, the file is
refused with the extra to install. Nothing in a file runs: `torch.load(weights_only=True)`,
with inert stand-ins for the classes torch does not allow (a pickled OmegaConf config).
"""

from __future__ import annotations

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
