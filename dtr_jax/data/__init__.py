"""Input data: named sources and the sharded grain pipeline."""

from dtr_jax.data.pipeline import device_batches, host_batches
from dtr_jax.data.sources import SOURCES, ArraySource, get_source


def validate_data(config) -> list[str]:
    """Problems with `config.data` and its fit to the model (field names included)."""
    problems = []
    name = config.data.name
    if name not in SOURCES:
        problems.append(f"data.name={name!r} is unknown: allowed {list(SOURCES)}")
    elif name == "digits":
        m = config.model
        if (m.input_size, m.in_channels) != (8, 1) or m.num_classes not in (1, 10):
            problems.append(
                f"data.name='digits' holds 8x8x1 images of 10 classes: set model.input_size=8, "
                f"model.in_channels=1, model.num_classes=10 (got {m.input_size}, "
                f"{m.in_channels}, {m.num_classes})"
            )
    if config.data.prefetch < 0 or config.data.num_threads < 0:
        problems.append("data.prefetch and data.num_threads must be >= 0")
    return problems


__all__ = [
    "ArraySource",
    "SOURCES",
    "device_batches",
    "get_source",
    "host_batches",
    "validate_data",
]
