"""LoRA-GA's cache: the estimated statistics and the resulting init, keyed by everything they depend on (the model's
source and config, the LoRA and LoRA-GA configs, a fingerprint of the weights, the estimation batches' bytes).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxlora import lora as lora_lib
from jaxlora.lora.weights import LoraWeights


def weights_fingerprint(params) -> list:
    """Three moments of every weight (sum, sum of squares, sum weighted by the position along the last axis), to 6
    significant digits: a changed checkpoint under the same path changes the cache key, while the reduction order of
    another mesh does not. One jitted pass over the weights, read where they lie."""
    def moments(x):
        x = x.astype(jnp.float32)
        ramp = jax.lax.broadcasted_iota(jnp.float32, x.shape, x.ndim - 1) / max(x.shape[-1], 1) if x.ndim else 1.0
        return jnp.stack([jnp.sum(x), jnp.sum(x * x), jnp.sum(x * ramp)])
    flat = traverse_util.flatten_dict(params)
    values = jax.device_get(jax.jit(lambda f: {"/".join(k): moments(v) for k, v in f.items()})(flat))
    return [(name, [f"{float(m):.6e}" for m in values[name]]) for name in sorted(values)]


class Cache:
    """Estimated statistics and the resulting init, keyed by everything they depend on."""

    def __init__(self, folder, model, lora_config, ga, batches, params):
        h = hashlib.sha256()
        h.update(json.dumps([str(model.source), repr(model.config), repr(lora_config), repr(ga),
                             weights_fingerprint(params)], default=str).encode())
        for b in batches:
            for k in ("input_ids", "attention_mask", "labels"):
                h.update(np.ascontiguousarray(b[k]).tobytes())
        self.folder = Path(folder) / h.hexdigest()[:20]

    def load_init(self, targets, dropout: float):
        path = self.folder / "init.safetensors"
        if not path.exists():
            return None
        from safetensors.numpy import load_file
        arrays = load_file(str(path))
        tree = {}
        for t in targets:
            key = "/".join(t.path)
            a0, b0 = jnp.asarray(arrays[key + "/a0"]), jnp.asarray(arrays[key + "/b0"])
            tree[t.path] = LoraWeights(a=a0, b=b0, scale=t.scale, dropout=dropout)
        return traverse_util.unflatten_dict(tree)

    def save_init(self, lora):
        arrays = {}
        for path, w in lora_lib.lora_items(lora):
            arrays["/".join(path) + "/a0"] = np.asarray(jax.device_get(w.a0))
            arrays["/".join(path) + "/b0"] = np.asarray(jax.device_get(w.b0))
        self._write("init.safetensors", arrays)

    def save_stats(self, grads):
        arrays = {"/".join(p): np.asarray(jax.device_get(g)) for p, g in traverse_util.flatten_dict(grads).items()}
        self._write("gradients.safetensors", arrays)

    def _write(self, name, arrays):
        if jax.process_index() != 0:
            return
        from safetensors.numpy import save_file
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / (name + ".tmp")
        save_file(arrays, str(tmp))
        tmp.rename(self.folder / name)
