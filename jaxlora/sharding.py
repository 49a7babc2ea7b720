"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter is declared with logical axis names ("embed", "heads", "mlp", "vocab", "layers", ...); the mesh has
axes ("data", "fsdp", "tensor"). `DEFAULT_RULES` is the single place that decides how a name is split:

    kernel q_proj   ("layers", "embed", "heads")  ->  P(None, "fsdp", "tensor")
    LoRA a          ("layers", "embed", "lora_rank") -> P(None, "fsdp", None)     (input dim of its kernel)
    LoRA b          ("layers", "lora_rank", "heads") -> P(None, None, ("tensor", "fsdp"))
                    (output dim of its kernel, and over fsdp when that is unused: `with_unused_axis`)
    batch           ("batch", "seq")               ->  P(("data", "fsdp"), None)

A dimension that a mesh axis does not divide is replicated instead (e.g. 3 KV heads on a tensor axis of 2), so any
model runs on any mesh; for a parameter (`tree_shardings`) the fallback is a WARNING, once per distinct (logical
axes, shape, mesh), as every device then holds that dimension whole.

Activations follow the same table: inside `activation_sharding(mesh)` (which `Model.apply` enters while it is traced)
`constrain(x, names)` pins a hidden state to its logical axes, e.g. ("batch", None, "heads"). Without these pins XLA is
free to keep activations replicated over the fsdp axis, and under pure FSDP every chip would hold the activations
of the whole global batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "tensor"),  # MoE experts (Mixtral): expert-parallel over the tensor axis, before their "mlp" dim
    ("norm", None),
    ("lora_rank", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # data-parallel replicas; -1 = all devices left over by fsdp and tensor
    fsdp: int = 1  # parameters (and optimizer state) split over this axis, gathered per layer
    tensor: int = 1  # tensor (model) parallelism over heads / mlp / vocab

    def __post_init__(self):
        for name in MESH_AXES:
            size = getattr(self, name)
            if size == 0 or size < -1:
                raise ValueError(f"mesh.{name} must be a positive size or -1, got {size}")
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            raise ValueError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); -1 takes the remaining devices."""
    if devices is None:
        from jaxlora.backends import skip_tpu_backend_without_tpu
        skip_tpu_backend_without_tpu()  # the first backend may start here: no libtpu noise on CPU/GPU hosts
        devices = jax.devices()
    devices = list(devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


_WARNED_REPLICATIONS: set[tuple] = set()  # (logical axes, shape, dim, mesh shape) already warned about


def _replication_fallback(names, shape, mesh: Mesh, d: int, axes: tuple[str, ...], size: int, warn: bool) -> None:
    what = (f"parameter with logical axes {tuple(names)} and shape {tuple(shape)} on mesh {dict(mesh.shape)}: "
            f"dim {d} ({names[d]}, {shape[d]}) is not divisible by mesh axes {axes} (size {size}), so it is "
            f"replicated")
    key = (tuple(names), tuple(shape), d, tuple(mesh.shape.items()))
    if warn and key not in _WARNED_REPLICATIONS:
        _WARNED_REPLICATIONS.add(key)
        log.warning("%s: every device holds it whole", what)
    else:
        log.debug("%s", what.removeprefix("parameter with "))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES, *, warn: bool = False) -> P:
    """PartitionSpec for one array: each logical name mapped by `rules`, unless the mesh axis does not divide it
    (then replicated: a WARNING with warn=True, as for parameters, once per distinct case; else DEBUG)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for d, (name, dim) in enumerate(zip(names, shape)):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if axes and dim % size:
            _replication_fallback(names, shape, mesh, d, axes, size, warn)
            axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*spec)


def with_unused_axis(spec: P, shape: Sequence[int], mesh: Mesh, axis: str = "fsdp", dim: int = -1) -> P:
    """`spec` with mesh `axis` added to dimension `dim` when no dimension uses it yet and the result divides.

    For LoRA's b (r, out): its out dim follows the kernel's (tensor for q/k/v/gate/up), so under pure FSDP b and
    its Adam moments would be whole on every chip; splitting out over fsdp as well keeps them 1/fsdp per chip."""
    padded = tuple(spec) + (None,) * (len(shape) - len(spec))
    entries = [e if isinstance(e, tuple) else ((e,) if e else ()) for e in padded]
    if mesh.shape.get(axis, 1) == 1 or any(axis in e for e in entries):
        return spec
    d = dim % len(shape)
    axes = entries[d] + (axis,)
    if shape[d] % int(np.prod([mesh.shape[a] for a in axes])):
        return spec
    entries[d] = axes
    return P(*[e[0] if len(e) == 1 else (e or None) for e in entries])


def named_sharding(names, shape, mesh: Mesh, rules=DEFAULT_RULES, *, warn: bool = False) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules, warn=warn))


def tree_shardings(axes_tree, shape_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """Maps a tree of parameters' logical-name tuples and a matching tree of shapes (anything with .shape) to
    NamedShardings; a dim left replicated because its mesh axes do not divide it is a WARNING (once per case)."""
    return jax.tree.map(lambda names, x: named_sharding(names, x.shape, mesh, rules, warn=True), axes_tree,
                        shape_tree, is_leaf=lambda n: isinstance(n, tuple))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, batch_size: int | None = None) -> NamedSharding:
    """Batch arrays of any rank ((B, T) ids, (B,) class labels or group ids): the leading dim over (data, fsdp),
    every other dim replicated. With `batch_size`, a batch the mesh does not divide (e.g. one 2-row batch on 8
    devices) is replicated instead."""
    if batch_size is not None:
        return NamedSharding(mesh, P(logical_to_spec(("batch",), (batch_size,), mesh, rules)[0]))
    axes = dict(rules)["batch"]
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if mesh.shape[a] > 1)
    return NamedSharding(mesh, P(axes or None))


def batch_divisor(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    """How many ways the batch dim is split (data x fsdp): a training micro-batch must be a multiple."""
    axes = dict(rules)["batch"]
    return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


_ACTIVATION_MESH: contextvars.ContextVar = contextvars.ContextVar("jaxlora_activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
    """While tracing inside this context, `constrain` pins activations to `mesh` (through `rules`)."""
    token = _ACTIVATION_MESH.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` of activation `x` to its logical axes under `activation_sharding`; the identity
    outside it or on one device. A dimension the mesh does not divide stays replicated (as for parameters)."""
    ctx = _ACTIVATION_MESH.get()
    if ctx is None or ctx[0].size == 1:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, named_sharding(names, x.shape, mesh, rules))


def activation_axes(ndim: int, feature_axis: str | None) -> tuple[str | None, ...]:
    """Logical axes of a (batch, ..., features) activation whose last dim is a kernel's `feature_axis`: "embed"
    (split over fsdp in parameters) is kept whole in activations, which are split over the batch instead."""
    return ("batch",) + (None,) * (ndim - 2) + (None if feature_axis == "embed" else feature_axis,)


def place_batch(batch: dict, mesh) -> dict:
    """This process's rows -> global arrays sharded over (data, fsdp) (replicated if the mesh does not divide them)."""
    rows = next(iter(batch.values())).shape[0] * jax.process_count()
    shard = batch_sharding(mesh, batch_size=rows)
    return {k: jax.make_array_from_process_local_data(shard, v) for k, v in batch.items()}
