"""Typed configs from YAML files plus ``--set`` command-line overrides.

Every config in jaxlora is a frozen dataclass (written with
``from __future__ import annotations``); the dataclass *is* the schema, with
types and defaults.  A YAML file in ``configs/`` only fills that schema in, and
the command line takes a config file plus dotted overrides such as
``--set optim.learning_rate=3e-4 --set lora.target_modules=[q_proj,v_proj]``.

The point of this module is that a mistake is caught before anything runs and
reported as one clear :class:`ConfigError` naming the dotted key and where it
came from, e.g.::

    unknown key 'optim.lerning_rate' in configs/x.yaml (did you mean
    'optim.learning_rate'?); known keys of optim: learning_rate, schedule, ...
    optim.learning_rate in --set optim.learning_rate=abc: expected float, got str 'abc'

No third-party config library: values are checked against the type hints of
the dataclass fields (bool, int, float, str, None, Literal, list, tuple, dict,
unions, nested dataclasses).  Numbers are never parsed from strings here; YAML
already types values (with a loader that also reads ``3e-4`` as a float, which
PyYAML's YAML 1.1 rules would leave as a string).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not fit the config schema."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5``, ``3e-4``, ``5E+2``, ``1.0e5`` as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[0-9][0-9_]*[eE][-+]?[0-9]+
                    |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?)$""", re.X),
    list("-+0123456789."),
)


# --------------------------------------------------------------------------- #
# Where a value came from (for messages).

class _Source:
    """Describes the origin of a dotted key: the file, and/or ``--set`` overrides."""

    def __init__(self, where: str = "", file_data: Any = None, overrides: Sequence[tuple[tuple, str]] = ()):
        self.where, self.file_data, self.overrides = where, file_data, list(overrides)

    def describe(self, path: tuple) -> str:
        covering = [text for opath, text in self.overrides if path[:len(opath)] == opath]
        if covering:  # an override set this key (or a parent of it) wholesale
            return "--set " + covering[-1]
        deeper = ["--set " + text for opath, text in self.overrides if opath[:len(path)] == path]
        in_file = not deeper or _has_path(self.file_data, path)
        return ", ".join(([self.where] if self.where and in_file else []) + deeper)

    def at(self, path: tuple) -> str:
        key, src = _key(path) or "top level", self.describe(path)
        return f"{key} in {src}" if src else key


def _has_path(data: Any, path: tuple) -> bool:
    for part in path:
        if isinstance(part, int):
            return True  # list items: their parent exists, good enough
        if not isinstance(data, Mapping) or part not in data:
            return False
        data = data[part]
    return True


def _key(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _show(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None) or tp is None:
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------- #
# dict -> dataclass

def from_dict(cls: type[T], data: Mapping, *, where: str = "") -> T:
    """Build the (possibly nested) frozen dataclass ``cls`` from ``data``.

    ``where`` (a file name) is used in error messages.  Raises ConfigError for
    unknown keys, wrong types, missing required keys and ``__post_init__``
    ValueErrors, naming the full dotted key.
    """
    return _build(cls, data, (), _Source(where))


def _build(cls: type, data: Any, path: tuple, src: _Source) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{src.at(path)}: expected a mapping ({cls.__name__}), got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            sub = path + (str(name),)
            hint = difflib.get_close_matches(str(name), fields, n=1)
            maybe = f" (did you mean '{_key(path + (hint[0],))}'?)" if hint else ""
            section = f"known keys of {_key(path)}" if path else "known top-level keys"
            where = src.describe(sub)
            raise ConfigError(f"unknown key '{_key(sub)}'{' in ' + where if where else ''}{maybe}; "
                              f"{section}: {', '.join(fields)}")
        kwargs[name] = _convert(hints[name], value, path + (name,), src)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{_key(path + (name,))}'"
                              + (f" in {src.describe(path)}" if src.describe(path) else ""))
    try:
        return cls(**kwargs)
    except ValueError as e:  # the dataclass's own __post_init__ check
        raise ConfigError(f"{src.at(path)}: {e}") from e


def _shape_ok(tp: Any, value: Any) -> bool:
    """Could ``value`` be a ``tp`` at all? (Used to pick the union member whose error to show.)"""
    origin = typing.get_origin(tp) or tp
    if tp is Any or tp is object:
        return True
    if dataclasses.is_dataclass(tp) or origin is dict:
        return isinstance(value, Mapping)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is Literal:
        return isinstance(value, tuple(type(a) for a in typing.get_args(tp)))
    return isinstance(value, tp) or (tp is float and isinstance(value, int))


def _convert(tp: Any, value: Any, path: tuple, src: _Source) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def mismatch() -> ConfigError:
        return ConfigError(f"{src.at(path)}: expected {_type_name(tp)}, got {_show(value)}")

    if tp is Any or tp is object:
        return value
    if tp is type(None) or tp is None:
        if value is None:
            return None
        raise mismatch()
    if origin in (Union, types.UnionType):
        candidates = [a for a in args if _shape_ok(a, value)]
        errors = []
        for member in candidates:
            try:
                return _convert(member, value, path, src)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else mismatch()
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise mismatch()
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, src)
    if tp is bool or tp is str:
        if isinstance(value, tp):
            return value
        raise mismatch()
    if tp is int or tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float) if tp is float else int):
            raise mismatch()
        return tp(value)
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise mismatch()
        item = args[0] if args else Any
        return [_convert(item, v, path + (i,), src) for i, v in enumerate(value)]
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise mismatch()
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            items = [args[0] if args else Any] * len(value)
        elif len(args) != len(value):
            raise ConfigError(f"{src.at(path)}: expected {len(args)} items ({_type_name(tp)}), got {_show(value)}")
        else:
            items = list(args)
        return tuple(_convert(t, v, path + (i,), src) for i, (t, v) in enumerate(zip(items, value)))
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise mismatch()
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, path + (str(k),), src): _convert(vt, v, path + (str(k),), src)
                for k, v in value.items()}
    raise TypeError(f"configfile: unsupported field type {tp!r} for {_key(path)}")


# --------------------------------------------------------------------------- #
# dataclass -> dict, overrides, files

def to_dict(obj: Any) -> Any:
    """Inverse of from_dict: dataclasses -> dicts, tuples -> lists (plain YAML-able data)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.learning_rate=3e-4"`` -> ``(["optim", "learning_rate"], 0.0003)``; value is YAML."""
    key, sep, raw = text.partition("=")
    keys = [k.strip() for k in key.split(".")]
    if not sep or not all(keys):
        raise ConfigError(f"bad override {text!r}: expected the form --set section.key=value "
                          "(e.g. --set optim.learning_rate=3e-4)")
    try:
        return keys, yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"bad value in --set {text}: {getattr(e, 'problem', None) or e}") from e


def apply_overrides(data: Mapping, overrides: Sequence[str]) -> dict:
    """Return a copy of ``data`` with each ``a.b=value`` override set (keys checked later)."""
    out = copy.deepcopy(dict(data))
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for i, k in enumerate(keys[:-1]):
            if node.get(k) is None:
                node[k] = {}
            elif not isinstance(node[k], dict):
                raise ConfigError(f"--set {text}: '{'.'.join(keys[:i + 1])}' is a {type(node[k]).__name__}, "
                                  "not a section")
            node = node[k]
        node[keys[-1]] = value
    return out


def load_config(cls: type[T], path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> T:
    """Read the YAML file at ``path`` (None: defaults only), apply ``--set`` overrides, build ``cls``."""
    data: Any = {}
    where = os.fspath(path) if path is not None else ""
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.load(f, Loader=_Loader)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {where}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {where}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            mark, ctx = getattr(e, "problem_mark", None), getattr(e, "context", None)
            line = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            if ctx and getattr(e, "context_mark", None):
                ctx = f"{ctx} (line {e.context_mark.line + 1})"
            problem = "; ".join(filter(None, [ctx, getattr(e, "problem", None)])) or str(e)
            raise ConfigError(f"{where}{line}: invalid YAML: {problem}") from None
        if data is None:  # an empty file means "all defaults"
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: the top level must be a mapping of keys to values, "
                              f"got {type(data).__name__}")
    merged = apply_overrides(data, overrides)
    src = _Source(where, data, [(tuple(parse_override(t)[0]), t) for t in overrides])
    return _build(cls, merged, (), src)


def dump_config(obj: Any, path: str | os.PathLike) -> None:
    """Write the resolved config ``obj`` as YAML (kept next to a run's outputs to reproduce it), atomically."""
    from jaxlora.io.atomic import write_atomically
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    write_atomically(path, yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False))
