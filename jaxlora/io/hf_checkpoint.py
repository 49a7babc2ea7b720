"""Hugging Face safetensors <-> Flax param trees, through one declarative name table per model family.

Reading: safetensors files (one file or a sharded `model.safetensors.index.json`) are memory-mapped, not loaded:
`safe_open(framework="numpy")` cannot return bfloat16, so the (trivial) header is parsed here and each tensor is a
zero-copy `np.memmap` view with `ml_dtypes` dtypes. Every parameter is then built with
`jax.make_array_from_callback` straight into its `NamedSharding`: each device reads only its slice, so a 7B model is
never materialized on one device (or in host RAM) first.

The name table maps our param paths to HF keys (and back, for export):

    ("model/layers/(self_attn|mlp)/(\\w+)/kernel", "model.layers.{layer}.{0}.{1}.weight", transpose)

`{layer}` marks a stacked (scanned) parameter: one HF tensor per layer is stacked on a leading axis; `{expert}` one
stacked over experts as well (Mixtral's "...experts.{expert}.w1.weight": a (layers, experts, ...) param, one HF
tensor per layer and expert, layer-major). Every expected
key must be present with the expected shape, and every key in the files must be expected (or explicitly ignored);
anything else is an error naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


class CheckpointError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class NameRule:
    """Our param path (regex over '/'-joined path) -> HF key template ({0}.. = groups, {layer} = layer index,
    {expert} = expert index)."""

    path: str
    hf: str
    transpose: bool = False


@dataclasses.dataclass(frozen=True)
class NameTable:
    rules: tuple[NameRule, ...]
    ignore: tuple[str, ...] = ()  # regexes of HF keys that are read past (e.g. rotary_emb.inv_freq)
    stack_name: str = "layers"  # the scanned module whose params carry a leading layer axis
    base_prefix: str = ""  # the base model's key prefix ("transformer."), absent from some checkpoints (hub GPT-2,
    #                        BLOOM store "h.0.attn..."): reading accepts both, export writes it
    output_module: str = "lm_head"  # the output head, which target_modules="all-linear" leaves out (as PEFT)
    optional: tuple[str, ...] = ()  # regexes of our param paths a checkpoint may lack (a classifier head over a
    #                                 bare encoder): those start fresh, as in transformers; all of a module or none


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One param leaf and the HF tensors it is made of (one per layer when stacked)."""

    path: tuple[str, ...]
    hf_keys: tuple[str, ...]
    transpose: bool
    stacked: bool
    experts: int = 0  # > 0: also stacked over this many experts (after the layer axis); hf_keys layer-major

    @property
    def lead(self) -> int:
        """How many leading (layer, expert) axes index the HF tensors."""
        return int(self.stacked) + int(self.experts > 0)


def plan_mapping(table: NameTable, abstract_params, num_layers: int) -> list[TensorMapping]:
    """Expands the table over the model's param leaves; every leaf must be covered by exactly one rule."""
    out = []
    for path, leaf in traverse_util.flatten_dict(abstract_params).items():
        joined = "/".join(path)
        hits = [(rule, m) for rule in table.rules if (m := re.fullmatch(rule.path, joined))]
        if len(hits) != 1:
            raise CheckpointError(f"name table covers param {joined} {len(hits)} times (expected once)")
        rule, m = hits[0]
        stacked = table.stack_name in path
        layers = range(num_layers) if stacked else [None]
        n_experts = leaf.shape[int(stacked)] if "{expert}" in rule.hf else 0
        keys = tuple(rule.hf.format(*m.groups(), layer=layer, expert=expert)
                     for layer in layers for expert in (range(n_experts) if n_experts else [None]))
        out.append(TensorMapping(path, keys, rule.transpose, stacked, n_experts))
    return out


# ----------------------------------------------------------------------------------------------- reading


class SafetensorsFolder:
    """Lazy, zero-copy access to every tensor of a folder's safetensors files."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no *.safetensors files (nor model.safetensors.index.json)")
        self._where: dict[str, tuple[str, dict]] = {}
        self._maps: dict[str, np.memmap] = {}
        for name in files:
            for key, info in self._read_header(self.folder / name).items():
                self._where[key] = (name, info)

    def _read_header(self, path: Path) -> dict:
        if not path.exists():
            raise CheckpointError(f"{path}: listed in the index but missing")
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{path}: not a safetensors file (bad or truncated header)")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for key, info in header.items():
            start, end = info["data_offsets"]
            if 8 + n + end > size:
                raise CheckpointError(f"{path}: truncated: tensor {key} ends at byte {8 + n + end}, file has {size}")
            if info["dtype"] not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
            info["offset"] = 8 + n
        return header

    def keys(self) -> set[str]:
        return set(self._where)

    def file_of(self, key: str) -> str:
        return self._where[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][1]["shape"])

    def get(self, key: str) -> np.ndarray:
        name, info = self._where[key]
        if name not in self._maps:
            self._maps[name] = np.memmap(self.folder / name, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        raw = self._maps[name][info["offset"] + start: info["offset"] + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def check_keys(table: NameTable, mapping: list[TensorMapping], files: SafetensorsFolder, folder) -> None:
    expected = {k for m in mapping for k in m.hf_keys}
    present = files.keys()
    missing = sorted(expected - present)
    if missing:
        raise CheckpointError(f"{folder}: missing weight {missing[0]}" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(k for k in present - expected if not any(re.fullmatch(p, k) for p in table.ignore))
    if unexpected:
        raise CheckpointError(f"{folder}/{files.file_of(unexpected[0])}: unexpected weight {unexpected[0]} "
                              f"(shape {files.shape(unexpected[0])}) matches no parameter of this model")


def load_params(folder, table: NameTable, abstract_params, shardings, num_layers: int,
                init_missing: Callable[[list[tuple[str, ...]]], dict] | None = None,
                quantized: dict[tuple[str, ...], Callable] | None = None):
    """Reads a HF safetensors folder into a param tree placed directly into `shardings`.

    Params the table marks optional whose tensors are all absent come from `init_missing(paths)` (a flat
    {path: array}); without it they are missing weights like any other. A param in `quantized` is built by its
    `place(hf_keys, read)`, where `read(key, sharding)` puts one HF tensor (in our layout, float32) into `sharding`:
    `jaxlora.quant` quantizes layer by layer there (`abstract_params` then holds its QArray, whose .shape is the
    dense one and is checked like any other).
    """
    files = SafetensorsFolder(folder)
    mapping = plan_mapping(table, abstract_params, num_layers)
    prefix = table.base_prefix
    if prefix and not any(k.startswith(prefix) for k in files.keys()):  # saved from the bare base model
        mapping = [dataclasses.replace(m, hf_keys=tuple(k.removeprefix(prefix) for k in m.hf_keys)) for m in mapping]
    absent = [m for m in mapping if init_missing is not None and not set(m.hf_keys) & files.keys()
              and any(re.fullmatch(p, "/".join(m.path)) for p in table.optional)]
    mapping = [m for m in mapping if m not in absent]
    check_keys(table, mapping, files, folder)
    flat_abs = traverse_util.flatten_dict(abstract_params)
    flat_shard = traverse_util.flatten_dict(shardings)
    out = {}
    for m in mapping:
        target = flat_abs[m.path]
        per_layer = target.shape[m.lead:]
        for key in m.hf_keys:
            shape = files.shape(key)
            got = shape[::-1] if m.transpose else shape
            if tuple(got) != tuple(per_layer):
                raise CheckpointError(f"{folder}/{files.file_of(key)}: {key} has shape {shape}, the model "
                                      f"expects {tuple(per_layer[::-1]) if m.transpose else tuple(per_layer)} "
                                      f"(check config.json)")
        if quantized and m.path in quantized:
            out[m.path] = quantized[m.path](m.hf_keys, lambda key, sh, m=m: _place_one(files, key, m.transpose, sh))
        else:
            out[m.path] = _place(files, m, target, flat_shard[m.path])
    if absent:
        out.update(init_missing([m.path for m in absent]))
    return traverse_util.unflatten_dict(out)


def _place(files: SafetensorsFolder, m: TensorMapping, target, sharding) -> jax.Array:
    dtype = np.dtype(target.dtype)

    def read(key, index):
        t = files.get(key)
        t = t.T if m.transpose else t
        return np.asarray(t[index], dtype=dtype)

    def callback(index):
        if not m.lead:
            return read(m.hf_keys[0], index)
        which = np.arange(len(m.hf_keys)).reshape(target.shape[:m.lead])[index[:m.lead]]  # the (layer, expert) slice
        parts = [read(m.hf_keys[i], index[m.lead:]) for i in which.ravel()]
        return np.stack(parts).reshape(which.shape + parts[0].shape)

    return jax.make_array_from_callback(target.shape, sharding, callback)


def _place_one(files: SafetensorsFolder, key: str, transpose: bool, sharding) -> jax.Array:
    """One HF tensor (transposed to our layout) as float32 in `sharding`, each device reading its slice."""
    shape = files.shape(key)[::-1] if transpose else files.shape(key)

    def callback(index):
        t = files.get(key)
        return np.asarray((t.T if transpose else t)[index], dtype=np.float32)
    return jax.make_array_from_callback(tuple(shape), sharding, callback)


# ----------------------------------------------------------------------------------------------- writing


def iter_hf_tensors(params, table: NameTable, num_layers: int) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, host array in HF layout) for every param, gathered one tensor at a time."""
    mapping = plan_mapping(table, params, num_layers)
    flat = traverse_util.flatten_dict(params)
    for m in mapping:
        value = np.asarray(jax.device_get(_gather(flat[m.path])))
        value = value.reshape((-1,) + value.shape[m.lead:]) if m.lead else value
        for i, key in enumerate(m.hf_keys):
            t = value[i] if m.lead else value
            yield key, np.ascontiguousarray(t.T if m.transpose else t)


def _gather(x: jax.Array) -> jax.Array:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(x, tiled=True)
    return x


def write_safetensors(tensors: Iterator[tuple[str, np.ndarray]], out_dir: Path,
                      max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes HF safetensors (sharded with an index when larger than max_shard_bytes)."""
    from safetensors.numpy import save_file
    shards, current, size = [], {}, 0
    for key, t in tensors:
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += t.nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.nbytes for t in shard.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def check_output_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """out_dir as a Path if a folder can be written there: CheckpointError when it, or a folder above it, is a file,
    or when it is a non-empty folder and not `overwrite`."""
    out = Path(out_dir)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "" if blocker == out else f" (in the output path {out})"
        raise CheckpointError(f"{blocker} is a file, not a folder{where}; choose a folder path for the output")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty; choose another folder or pass overwrite")
    return out


def atomic_folder(out_dir: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Runs `write(tmp)` into a temporary sibling folder, then renames it to out_dir: never half-written."""
    out = check_output_folder(out_dir, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:  # e.g. no permission: one clear error, not a traceback
        raise CheckpointError(f"cannot create the output folder {out}: {e.strerror or e}") from e
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes the folder private (0700); an export is shared like any folder
        if out.exists():
            import shutil
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
