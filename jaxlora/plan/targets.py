"""Where a plan compiles for: the TPU chip table, target names -> `Target`, and the target's devices.

A target is a Cloud TPU name ("v5p-32", "v5e-16"), a libtpu topology name ("v5:2x2x4"), one host's CUDA GPUs
("h100x8"), or "cpu8" (host CPU devices, no libtpu needed). TPU devices are compile-only devices from libtpu
(`jax.experimental.topologies`), so no chip is needed; GPU devices likewise come from the CUDA PJRT plugin given a
`GpuTargetConfigProto` (the GPU's description, `_gpu_target_config`), so neither a GPU nor the CUDA libraries are
needed. `_prepare_runtime` keeps the process's own backend on the CPU and tells libtpu it is on a compile-only host.
`PlanError` and `GiB` live here as the base the other plan modules build on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
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

# Per GPU: CUDA device name, compute capability, SMs, FP32 lanes per SM, shared memory per SM / per block (opt-in),
# L2 bytes, clock GHz, memory bandwidth B/s, memory bytes (H100: XLA's device_memory_size on an H100 SXM, from
# jax-ml/jax#28376; the others: nvidia-smi's total). What XLA's GPU compiler reads from a real device.
GPUS = {
    "h100": ("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 233472, 232448, 50 * 2 ** 20, 1.98, 3.35e12, 84929347584),
    "h200": ("NVIDIA H200", (9, 0), 132, 128, 233472, 232448, 50 * 2 ** 20, 1.98, 4.8e12, 143771 * 2 ** 20),
    "a100-80gb": ("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 167936, 166912, 40 * 2 ** 20, 1.41, 2.039e12, 80 * GiB),
    "a100-40gb": ("NVIDIA A100-SXM4-40GB", (8, 0), 108, 64, 167936, 166912, 40 * 2 ** 20, 1.41, 1.555e12, 40 * GiB),
}
_GPU_ALIASES = {"h100-80gb": "h100"}
GPU_MEM_FRACTION = 0.75  # jax's default XLA_PYTHON_CLIENT_MEM_FRACTION: the share of GPU memory XLA's pool takes
TARGET_FORMS = ("v4-32, v5p-32, v5e-16 (or v5litepod-16), v6e-8: the Cloud TPU name (cores for v4/v5p, chips for "
                "v5e/v6e); v4:2x2x4, v5:2x2x4, v5e:4x4, v6e:2x4: a libtpu topology name; h100, h100x8, h200x8, "
                "a100-80gbx4, a100-40gb: N CUDA GPUs of one host; cpu8: 8 host CPU devices")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as the user wrote it
    platform: str  # "tpu", "cuda" or "cpu"
    chip: str  # "v5p", ..., "h100", ..., or "cpu"
    topology: str | None  # libtpu name, e.g. "v5:2x2x4"; GPUs: "1x1x8" (slices x hosts x GPUs per host)
    num_slices: int
    num_devices: int
    hbm_bytes: int  # per chip (per CPU device: its share of host memory; per GPU: XLA's pool, a share of it)
    total_bytes: int | None = None  # per GPU: all its memory

    def describe(self) -> str:
        slices = f"{self.num_slices} x " if self.num_slices > 1 else ""
        where = f" ({self.topology})" if self.topology else ""
        pool = (f" (XLA_PYTHON_CLIENT_MEM_FRACTION {self.hbm_bytes / self.total_bytes:.2f} of "
                f"{self.total_bytes / GiB:.1f} GiB)" if self.total_bytes else "")
        return f"{slices}{self.name}{where}: {self.num_devices} devices, {self.hbm_bytes / GiB:.1f} GiB each{pool}"


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
    m = re.fullmatch(r"([a-z0-9-]+?)(?:x(\d+))?", name)
    if m and (gpu := _GPU_ALIASES.get(m.group(1), m.group(1))) in GPUS:  # one host's GPUs: "h100x8"
        return _gpu_target(name, gpu, int(m.group(2) or 1), num_slices)
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


def _gpu_target(name: str, gpu: str, count: int, num_slices: int) -> Target:
    if num_slices != 1 or not 1 <= count <= 8:
        raise PlanError(f"{name}: GPU targets are one host of 1 to 8 GPUs (e.g. {gpu}x8); valid forms: {TARGET_FORMS}")
    total = GPUS[gpu][-1]
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEM_FRACTION))
    return Target(name, "cuda", gpu, f"1x1x{count}", 1, count, int(total * fraction), total)


def _gpu_target_config(gpu: str) -> str:
    """The GPU's GpuTargetConfigProto (text format): what XLA's GPU compiler would read from the device."""
    kind, (major, minor), sms, fpus, smem_sm, smem_optin, l2, ghz, bandwidth, memory = GPUS[gpu]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem_sm} threads_per_core_limit: 2048 core_count: {sms} fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(bandwidth)} l2_cache_size: {l2} clock_rate_ghz: {ghz} device_memory_size: {memory}
  shared_memory_per_block_optin: {smem_optin} cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 8 }} runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{kind}"
"""


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
    if target.platform == "cuda":
        return _gpu_devices(target)
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


def cuda_plugin_installed() -> bool:
    """Whether jax's CUDA 12 PJRT plugin is importable (it compiles for a described GPU; no GPU is needed)."""
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def _gpu_devices(target: Target) -> list:
    if not cuda_plugin_installed():
        raise PlanError(f"{target.name}: compiling for CUDA GPUs needs jax's CUDA plugin: {CUDA_PIP}")
    from jax.experimental import topologies
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=_gpu_target_config(target.chip),
                                            topology=target.topology)
    except Exception as e:  # e.g. a plugin built for another jaxlib
        raise PlanError(f"{target.name}: the CUDA plugin could not describe {target.topology} x {target.chip}: "
                        f"{e}; it must match jax {jax.__version__}: {CUDA_PIP}") from None
    return sorted(topo.devices, key=lambda d: d.id)


CUDA_PIP = f'pip install "jax[cuda12-local]=={jax.__version__}"  (the CUDA PJRT plugin, ~180 MB; no CUDA libraries)'
LIBTPU_PIP = f'pip install "jax[tpu]=={jax.__version__}"  (or: pip install --no-deps libtpu==0.0.42.1)'
