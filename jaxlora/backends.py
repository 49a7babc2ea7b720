"""Which JAX backends start: no TPU backend on a host without TPU chips, so CPU and GPU users see no libtpu noise.

With JAX_PLATFORMS unset, JAX starts every backend it knows, the TPU one too whenever libtpu is installed
(scripts/setup_env.sh installs it so that `jaxlora plan` can compile for TPUs). On a CPU or GPU host libtpu then finds
no TPU and writes errors to stderr ("Failed to find host bounds for accelerator type ...", "unexpected worker
hostname ..."), although JAX goes on without it. `skip_tpu_backend_without_tpu` runs before the first backend starts
(the CLI's commands, and `sharding.make_mesh` for library users) and drops the TPU backend only when no TPU is found.
"""

from __future__ import annotations

import glob
import os


def tpu_present() -> bool:
    """Whether this host has TPU chips: TPU PCI devices (JAX's own check), or a TPU VM's device files."""
    try:
        from jax._src import hardware_utils
        if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
            return True
    except Exception:  # noqa: BLE001 - a private JAX helper; the device files below still answer
        pass
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def skip_tpu_backend_without_tpu() -> None:
    """Keeps JAX from starting its TPU backend on a host without TPU chips.

    With JAX_PLATFORMS unset JAX starts every backend it knows, the TPU one too whenever libtpu is installed
    (scripts/setup_env.sh installs it so that `jaxlora plan` can compile for TPUs). On a CPU or GPU host libtpu then
    finds no TPU and writes errors to stderr ("Failed to find host bounds for accelerator type ...", "unexpected
    worker hostname ..."), although JAX goes on without it. So before any backend starts, and only when no TPU is
    found, the TPU backend is dropped from JAX's list; the other backends (CPU, GPU) are chosen as JAX would choose
    them. JAX_PLATFORMS or JAX_FORCE_TPU_INIT leave JAX's choice alone, and a TPU host keeps its TPU.
    """
    import jax
    from jax._src import xla_bridge
    if jax.config.jax_platforms or "JAX_FORCE_TPU_INIT" in os.environ or xla_bridge.backends_are_initialized():
        return
    if not tpu_present():
        getattr(xla_bridge, "_backend_factories", {}).pop("tpu", None)


