"""Cloud TPU slices, named as Cloud TPU names them, and each chip's published figures.

A slice name is what `gcloud compute tpus tpu-vm create --accelerator-type` takes:
`v4-8`, `v5p-8` (v4 and v5p count TensorCores, two per chip: 4 chips), `v5litepod-16`
or `v5e-16`, `v6e-8` (v5e and v6e count chips), or a topology as
`jax.experimental.topologies` names it (`v5e:4x8`, `v5p:4x4x20` for shapes the names do
not imply). `parse_slice` resolves either to a `Slice`: its chips, their layout and
hosts, and, through `Slice.devices`, compile-only devices of that topology that jax can
lower and compile for on any machine with libtpu installed (`--mode plan`).

The per-chip figures are those of each generation's Cloud TPU documentation page (peak
bf16 FLOP/s, HBM capacity and bandwidth), the page named in `Chip.source`. A bound
computed from them is a bound, not a measurement.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: what jax calls it, how its slices are laid out and named, and
    its published per-chip figures."""

    generation: str  # as in slice names: 'v5e'
    device_kind: str  # jax's Device.device_kind on this chip
    topology_prefix: str  # jax.experimental.topologies' name of the generation
    dims: int  # 2: a 2-D torus (v5e, v6e); 3: a 3-D torus or mesh (v4, v5p)
    cores_in_name: int  # TensorCores per chip counted by slice names (1: names count chips)
    chips_per_host: int  # chips on one TPU VM of a multi-host slice
    peak_bf16_flops: float  # FLOP/s per chip, dense bf16
    hbm_gib: float  # HBM per chip, GiB
    hbm_bytes_per_s: float  # HBM bandwidth per chip
    source: str  # the Cloud TPU documentation page of these figures


# Peak bf16 compute, HBM capacity and HBM bandwidth per chip, as each page states them
# ("Key chip specifications", checked 2026-12-07). v5e's and v5p's pages say GB for HBM:
# libtpu's compiler treats them as GiB (it allows 15.75 GiB of a v5e chip's 16).
CHIPS = {
    "v4": Chip(
        "v4", "TPU v4", "v4", 3, 2, 4, 275e12, 32.0, 1200e9, "https://cloud.google.com/tpu/docs/v4"
    ),
    "v5e": Chip(
        "v5e", "TPU v5 lite", "v5e", 2, 1, 8, 197e12, 16.0, 819e9, "https://cloud.google.com/tpu/docs/v5e"
    ),
    "v5p": Chip(
        "v5p", "TPU v5", "v5", 3, 2, 4, 459e12, 95.0, 2765e9, "https://cloud.google.com/tpu/docs/v5p"
    ),
    "v6e": Chip(
        "v6e", "TPU v6 lite", "v6e", 2, 1, 8, 918e12, 32.0, 1638e9, "https://cloud.google.com/tpu/docs/v6e"
    ),
}  # fmt: skip
ALIASES = {"v5litepod": "v5e"}  # Cloud TPU's accelerator type for v5e slices
# The 2-D slice shapes Cloud TPU offers (v5e, v6e), by chip count.
SHAPES_2D = {
    1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)
}  # fmt: skip
INSTALL = (
    "pip install 'jax[tpu]==VERSION' (libtpu from the package registry; "
    "or pip install -e '.[test]', which pins it)"
)


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: its generation, chip count and layout (chips along each axis)."""

    chip: Chip
    shape: tuple[int, ...]

    @property
    def chips(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def name(self) -> str:
        """The Cloud TPU name (`v5e-8`, `v4-8`), or the topology where no name implies it."""
        g = self.chip
        if default_shape(g, self.chips) == self.shape:
            return f"{g.generation}-{self.chips * g.cores_in_name}"
        return self.topology_name

    @property
    def topology_name(self) -> str:
        """jax.experimental.topologies' name: `v5e:2x4`, `v4:2x2x1`."""
        return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        """The chips of one host along each axis (a whole small slice is one host)."""
        if self.chips < self.chip.chips_per_host:
            return (*self.shape, 1)[:3] if self.chip.dims == 2 else self.shape
        return (2, 4, 1) if self.chip.chips_per_host == 8 else (2, 2, 1)

    @property
    def hosts(self) -> int:
        per_host = 1
        for d in self.host_bounds:
            per_host *= d
        return self.chips // per_host

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Wrap-around links per axis: v4/v5p full cubes (every axis a multiple of 4) are
        tori; v5e/v6e axes of 16 chips wrap."""
        if self.chip.dims == 3:
            torus = all(d % 4 == 0 for d in self.shape)
            return (torus,) * 3
        return (*(d == 16 for d in self.shape), False)

    def devices(self) -> list:
        """Compile-only devices of this topology (needs libtpu; no TPU needed)."""
        from jax.experimental import topologies

        kwargs = dict(chips_per_host_bounds=self.host_bounds, wrap=self.wrap)
        if self.chip.cores_in_name == 2:  # one device per chip, both TensorCores
            kwargs["chip_config_name"] = "megacore"
        return topologies.get_topology_desc(
            topology_name=self.topology_name, platform="tpu", **kwargs
        ).devices


def default_shape(chip: Chip, chips: int) -> tuple[int, ...] | None:
    """The layout Cloud TPU gives a slice of `chips` chips of this generation by its name
    alone; None where the name implies none. 3-D slices grow from 2x2x1 by doubling the
    last, middle, then first axis in turn (2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...)."""
    if chip.dims == 2:
        return SHAPES_2D.get(chips)
    if chips == 4:
        return (2, 2, 1)
    shape, axis = [2, 2, 2], 2
    while shape[0] * shape[1] * shape[2] < chips:
        shape[axis] *= 2
        axis = (axis - 1) % 3
    return tuple(shape) if shape[0] * shape[1] * shape[2] == chips else None


def parse_slice(text: str) -> Slice:
    """The Slice a name (`v5e-8`, `v5litepod-16`, `v4-32`) or a topology (`v5e:4x8`,
    `v5p:4x4x20`) stands for; ValueError saying what is allowed."""
    text = str(text).strip().lower()
    named = re.fullmatch(r"(v\d[a-z]*)-(\d+)", text)
    topo = re.fullmatch(r"(v\d[a-z]*):(\d+(?:x\d+)+)", text)
    if not (named or topo):
        raise ValueError(
            f"{text!r} is neither a Cloud TPU slice name (v4-8, v5e-8, v5litepod-16, v5p-8, "
            "v6e-8) nor a topology (v5e:4x8, v4:2x2x4)"
        )
    prefix = (named or topo).group(1)
    chip = _chip(ALIASES.get(prefix, prefix))
    if topo:
        shape = tuple(int(d) for d in topo.group(2).split("x"))
        if len(shape) != chip.dims or min(shape) < 1:
            raise ValueError(f"{text!r}: {chip.generation} topologies have {chip.dims} axes")
        return Slice(chip, shape)
    count = int(named.group(2))
    chips, rest = divmod(count, chip.cores_in_name)
    shape = None if rest else default_shape(chip, chips)
    if shape is None:
        raise ValueError(f"{text!r} is not a {chip.generation} slice: {_sizes(chip)}")
    return Slice(chip, shape)


def _chip(generation: str) -> Chip:
    for chip in CHIPS.values():
        if generation in (chip.generation, chip.topology_prefix):
            return chip
    allowed = ", ".join(list(CHIPS) + [f"{a} (= {g})" for a, g in ALIASES.items()])
    raise ValueError(f"{generation!r} is not a TPU generation dtr_jax knows: {allowed}")


def _sizes(chip: Chip) -> str:
    unit = "TensorCores, two per chip" if chip.cores_in_name == 2 else "chips"
    counts = [c * chip.cores_in_name for c in (4, 8, 16, 32, 64, 128, 256)]
    if chip.dims == 2:
        counts = [c * chip.cores_in_name for c in SHAPES_2D]
    examples = ", ".join(f"{chip.generation}-{n}" for n in counts)
    return (
        f"its names count {unit} ({examples}, ...); name other shapes as a topology "
        f"({chip.topology_prefix}:{'x'.join(['4'] * chip.dims)})"
    )


def chip_of(device_kind: str) -> Chip | None:
    """The Chip of a jax device kind ('TPU v5 lite'), None for other devices."""
    return next((c for c in CHIPS.values() if c.device_kind == device_kind), None)


def problems(topology: str) -> list[str]:
    """Problems with `plan.topology`: '' (this machine's TPUs) or a slice `parse_slice`
    reads; and libtpu, which compiling for a slice needs."""
    if not topology:
        return []
    try:
        parse_slice(topology)
    except ValueError as e:
        return [f"topology={topology!r}: {e}"]
    if not libtpu_installed():
        return [f"topology={topology!r} needs libtpu to compile for a TPU: {install_hint()}"]
    return []


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def install_hint() -> str:
    import jax

    return INSTALL.replace("VERSION", jax.__version__)


def tpu_chips_attached() -> bool:
    """Whether this machine has TPU chips (without starting any jax backend)."""
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError):  # another jax: look for the devices ourselves
        return any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0"))


def plan_without_tpus() -> None:
    """On a machine without TPU chips, `--mode plan` runs nothing itself: its jax backend
    is the CPU (unless JAX_PLATFORMS says otherwise), so that jax does not start libtpu,
    and its search for TPU hosts, before the plan asks for a slice. Call before jax
    starts a backend."""
    import jax

    if not tpu_chips_attached() and not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")


GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def cpu_without_accelerators() -> None:
    """Where libtpu is installed (the test extra installs it) on a machine with no TPU
    chips and no GPU plugin, jax ends on the CPU anyway: say so before it starts a
    backend, so that it does not first start libtpu, which searches for TPU hosts and
    prints pages of warnings about them. Nothing changes elsewhere, or where
    JAX_PLATFORMS is set."""
    import jax

    if jax.config.jax_platforms or not libtpu_installed() or tpu_chips_attached():
        return
    if any(importlib.util.find_spec(m) is not None for m in GPU_PLUGINS):
        return
    jax.config.update("jax_platforms", "cpu")


def compile_only_environment(accelerator_type: str) -> None:
    """The environment libtpu reads when it starts on a machine without TPUs, for a
    compile-only topology: it then skips its search for TPU hosts (and the warnings it
    prints about them), and several such processes may load it at once (its lock file
    guards real chips, which there are none of). Values set already are kept; on a TPU
    VM nothing is set."""
    if tpu_chips_attached():
        return  # a TPU VM: libtpu finds its own hosts
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
