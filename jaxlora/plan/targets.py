"""Where a plan compiles for: the TPU chip table, target names -> `Target`, and the target's devices.

A target is a Cloud TPU name ("v5p-32", "v5e-16"), a libtpu topology name ("v5:2x2x4"), or "cpu8" (host CPU
devices, no libtpu needed). TPU devices are compile-only devices from libtpu (`jax.experimental.topologies`), so no
chip is needed; `_prepare_runtime` keeps the process's own backend on the CPU and tells libtpu it is on a
compile-only host. `PlanError` and `GiB` live here as the base the other plan modules build on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax


GiB = 2 ** 30


class PlanError(ValueError):
    """A target, mesh or model that cannot be planned; the message says what to change."""


# Per chip kind: libtpu topology prefix, chip config, TensorCores per chip in the user-facing name, HBM per chip.
CHIPS = {
    "v4": ("v4", "megacore", 2, 32 * GiB),
    "v5p": ("v5", "megacore", 2, 95 * GiB),
    "v5e": ("v5e", "default", 1, 16 * GiB),
    "v6e": ("v6e", "default", 1, 32 * GiB),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}  # Cloud TPU names of v5e slices
TARGET_FORMS = ("v4-32, v5p-32, v5e-16 (or v5litepod-16), v6e-8: the Cloud TPU name (cores for v4/v5p, chips for "
                "v5e/v6e); v4:2x2x4, v5:2x2x4, v5e:4x4, v6e:2x4: a libtpu topology name; cpu8: 8 host CPU devices")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as the user wrote it
    platform: str  # "tpu" or "cpu"
    chip: str  # "v5p", ..., or "cpu"
    topology: str | None  # libtpu name, e.g. "v5:2x2x4"
    num_slices: int
    num_devices: int
    hbm_bytes: int  # per chip (per CPU device: its share of host memory)

    def describe(self) -> str:
        slices = f"{self.num_slices} x " if self.num_slices > 1 else ""
        where = f" ({self.topology})" if self.topology else ""
        return f"{slices}{self.name}{where}: {self.num_devices} devices, {self.hbm_bytes / GiB:.1f} GiB each"


def _grid(chips: int, ndim: int) -> list[int]:
    """Chip grid of a power-of-two slice as Cloud TPU lays it out: v5p-32 -> 2x2x4, v5e-16 -> 4x4."""
    dims = [1] * ndim
    while (n := math.prod(dims)) < chips:
        i = len(dims) - 1 - dims[::-1].index(min(dims))
        dims[i] *= 2
    if n != chips:
        raise PlanError(f"cannot lay out {chips} chips as a grid; give a topology name like v5:2x2x4 "
                        f"(valid forms: {TARGET_FORMS})")
    return sorted(dims)


def resolve_target(name: str, num_slices: int = 1) -> Target:
    """Parses a target name (see TARGET_FORMS) into chip kind, topology and HBM per chip."""
    if num_slices < 1:
        raise PlanError(f"num_slices must be >= 1, got {num_slices}")
    if m := re.fullmatch(r"cpu(\d*)", name):
        n = int(m.group(1) or 8)
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return Target(name, "cpu", "cpu", None, 1, n, host // n)
    if m := re.fullmatch(r"(v\w+?)-(\d+)", name):  # Cloud TPU name
        chip = _ALIASES.get(m.group(1), m.group(1))
        if chip not in CHIPS:
            raise PlanError(f"unknown TPU target {name!r}; valid forms: {TARGET_FORMS}")
        prefix, _, cores, hbm = CHIPS[chip]
        count = int(m.group(2))
        if count % cores or count == 0:
            raise PlanError(f"{name}: {chip} slices count {cores} cores per chip, so the size must be a multiple "
                            f"of {cores}; valid forms: {TARGET_FORMS}")
        dims = _grid(count // cores, 3 if cores == 2 else 2)
        topology = f"{prefix}:{'x'.join(map(str, dims))}"
    elif m := re.fullmatch(r"(v\w+):(\d+(?:x\d+)+)", name):  # libtpu topology name
        chip = {"v4": "v4", "v5": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}.get(m.group(1))
        if chip is None:
            raise PlanError(f"unknown TPU topology {name!r}; valid forms: {TARGET_FORMS}")
        prefix, _, cores, hbm = CHIPS[chip]
        dims = [int(d) for d in m.group(2).split("x")]
        if len(dims) != (3 if cores == 2 else 2):
            raise PlanError(f"{name}: {chip} topologies have {3 if cores == 2 else 2} dimensions; "
                            f"valid forms: {TARGET_FORMS}")
        topology = f"{prefix}:{m.group(2)}"
    else:
        raise PlanError(f"unknown target {name!r}; valid forms: {TARGET_FORMS}")
    chips = math.prod(dims)
    return Target(name, "tpu", chip, topology, num_slices, chips * num_slices, hbm)


def _prepare_runtime(cpu_devices: int) -> None:
    """Before any backend starts: CPU as the default platform with enough host devices, and libtpu told that this
    is a compile-only host (no metadata server, no lockfile shared with other processes)."""
    from jax._src import xla_bridge
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_ACCELERATOR_TYPE", "v5p-8")):
        os.environ.setdefault(key, value)
    if not xla_bridge.backends_are_initialized():
        if not jax.config.jax_platforms:
            jax.config.update("jax_platforms", "cpu")
        if jax.config.jax_num_cpu_devices < cpu_devices and "device_count" not in os.environ.get("XLA_FLAGS", ""):
            jax.config.update("jax_num_cpu_devices", cpu_devices)


def target_devices(target: Target) -> list:
    """The target's devices: compile-only TPU devices from libtpu, or host CPU devices."""
    _prepare_runtime(target.num_devices if target.platform == "cpu" else 1)
    if target.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < target.num_devices:
            raise PlanError(f"{target.name} needs {target.num_devices} CPU devices but jax has {len(devices)}: set "
                            f"XLA_FLAGS=--xla_force_host_platform_device_count={target.num_devices} before jax starts")
        return devices[:target.num_devices]
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise PlanError(f"{target.name}: compiling for TPU needs libtpu: {LIBTPU_PIP}") from None
    from jax.experimental import topologies
    dims = [int(d) for d in target.topology.split(":")[1].split("x")]
    bounds = (2, 2, 1) if len(dims) == 3 else (min(2, dims[0]), min(2, dims[1]), 1)  # chips per host
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                            chip_config_name=CHIPS[target.chip][1], chips_per_host_bounds=bounds,
                                            num_slices=target.num_slices)
    except Exception as e:  # libtpu's own message names the problem (e.g. an impossible grid)
        raise PlanError(f"{target.name}: libtpu rejected topology {target.topology}: {e}; "
                        f"valid forms: {TARGET_FORMS}") from None
    return sorted(topo.devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.id))


LIBTPU_PIP = f'pip install "jax[tpu]=={jax.__version__}"  (or: pip install --no-deps libtpu==0.0.42.1)'
