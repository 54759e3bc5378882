"""A flat, explicit registry that builds objects from config dicts.

``{"type": "ResNet", "depth": 50}`` builds ``ResNet(depth=50)``. Nested dicts that carry a ``type`` are built
first (bottom-up), so a parent receives ready objects; arguments whose name ends in ``_cfg``, or that the class
lists in its ``config_args`` attribute, stay dicts (the parent builds them itself, e.g. one norm layer per channel
count, one RoI layer per pyramid level). A dict passed to an argument annotated with a
dataclass becomes that dataclass, with its keys checked.

Every mistake is reported at build time with the pipeline file, the dotted key path and the closest valid names::

    pipelines/faster.yaml: model.backbone.depht: unknown argument of ResNet; did you mean 'depth'?
"""
from __future__ import annotations

import collections.abc
import contextvars
import dataclasses
import difflib
import inspect
import types
import typing
from typing import Any, Callable

from raydet.errors import RaydetError

__all__ = ["REGISTRY", "register", "build", "check", "build_dataclass", "ConfigError", "error", "build_context",
           "current_path", "closest"]


class ConfigError(RaydetError, ValueError):
    """A pipeline value is wrong. The message names the file and the dotted key path."""


_REGISTRY: dict[str, Callable] = {}
REGISTRY = _REGISTRY

# (source file, dotted path, {dotted path -> defining file}) of the value currently being built.
_CONTEXT: contextvars.ContextVar[tuple[str | None, str, dict]] = contextvars.ContextVar(
    "raydet_build_context", default=(None, "", {}))


def register(obj: Callable | None = None, *, name: str | None = None):
    """Register a class or factory under its own name (or ``name``). Usable as ``@register``."""

    def _add(o):
        key = name or o.__name__
        if key in _REGISTRY and _REGISTRY[key] is not o:
            raise KeyError(f"'{key}' is already registered by {_REGISTRY[key]!r}")
        _REGISTRY[key] = o
        return o

    return _add(obj) if obj is not None else _add


def closest(name: str, candidates) -> str:
    """' ; did you mean 'x'?' for the closest candidate, or '' if none is close."""
    match = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=3, cutoff=0.6)
    if not match:
        return ""
    return "; did you mean " + " or ".join(f"'{m}'" for m in match) + "?"


def _join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _origin(path: str) -> str | None:
    file, _, origins = _CONTEXT.get()
    # The most specific key that a file defined: drop the last ".key" or "[index]" until one is known.
    probe = path
    while probe:
        if probe in origins:
            return origins[probe]
        if probe.endswith("]"):
            probe = probe[:probe.rindex("[")]
        else:
            probe = probe.rsplit(".", 1)[0] if "." in probe else ""
    return file


def error(path: str, message: str) -> ConfigError:
    """A ConfigError prefixed with the defining file and the dotted key path."""
    file = _origin(path)
    where = f"{file}: " if file else ""
    return ConfigError(f"{where}{path or '<root>'}: {message}")


def current_path() -> str:
    return _CONTEXT.get()[1]


class build_context:
    """Sets the file, dotted path and key origins that errors raised by nested builds report."""

    def __init__(self, path: str = "", file: str | None = None, origins: dict | None = None):
        old_file, _, old_origins = _CONTEXT.get()
        self.value = (file if file is not None else old_file, path,
                      origins if origins is not None else old_origins)

    def __enter__(self):
        self.token = _CONTEXT.set(self.value)
        return self

    def __exit__(self, *exc):
        _CONTEXT.reset(self.token)


# ----------------------------------------------------------------------------------------------------------
# Type checking of scalar / container values against annotations.

def _matches(value, hint) -> bool:
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(hint)
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping) or hint is dict:
        if not isinstance(value, dict):
            return False
        args = typing.get_args(hint)
        return not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation we do not check (callables, protocols...)


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:  # a fixed set of values: "one of 'fail', 'skip'"
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType) and any(typing.get_origin(a) is typing.Literal for a in args):
        return " or ".join(_describe(a) for a in args)  # bool | Literal["decode"]: "bool or one of 'decode'"
    if origin is not None:  # list[int], Optional[float], int | None: show the arguments
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _hints(fn) -> dict:
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable forward references: skip type checks
        return {}


def _dataclass_of(hint):
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for h in typing.get_args(hint):
            if dataclasses.is_dataclass(h):
                return h
    return None


def build_dataclass(cls, value: dict, path: str):
    """Make dataclass ``cls`` from a dict, with unknown / missing keys and types reported at ``path``."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise error(path, f"expected a mapping for {cls.__name__}, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, v in value.items():
        if key not in fields:
            raise error(_join(path, key), f"unknown key of {cls.__name__}{closest(key, fields)} "
                        f"(valid: {', '.join(fields)})")
    for name, f in fields.items():
        if name not in value and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise error(_join(path, name), f"missing required key of {cls.__name__}")
    kwargs = {}
    for key, v in value.items():
        hint = hints.get(key, Any)
        nested = _dataclass_of(hint)
        if nested is not None and isinstance(v, dict):  # a dataclass field that is itself a dataclass
            kwargs[key] = build_dataclass(nested, v, _join(path, key))
            continue
        if not _matches(v, hint):
            raise error(_join(path, key), f"expected {_describe(hint)}, got {v!r}")
        kwargs[key] = v
    with build_context(path):
        try:
            return cls(**kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError, AssertionError) as exc:  # __post_init__ checks
            raise error(path, f"invalid {cls.__name__}: {exc}") from exc


def build(cfg: Any, path: str | None = None, **default_args):
    """Build ``cfg`` (a dict with ``type``) into an object.

    Args:
        cfg: ``{"type": Name, **kwargs}``; an already built object is returned unchanged; None stays None.
        path: dotted key path of ``cfg`` in the pipeline, for error messages (default: the current context).
        default_args: keyword arguments used when ``cfg`` does not set them.
    """
    if cfg is None or not isinstance(cfg, dict):
        return cfg
    path = current_path() if path is None else path
    type_name, factory, kwargs, hints = _arguments(cfg, path, default_args)
    built = {}
    for key, value in kwargs.items():
        sub = _join(path, key)
        hint = hints.get(key, Any)
        dc = _dataclass_of(hint)
        if dc is not None and isinstance(value, dict):
            built[key] = build_dataclass(dc, value, sub)
            continue
        value = _build_nested(value, sub, skip=_kept_as_dict(factory, key))
        if not _is_built(value) and not _matches(value, hint):
            raise error(sub, f"{type_name} expects {_describe(hint)}, got {value!r}")
        built[key] = value

    with build_context(path):
        try:
            return factory(**built)
        except ConfigError:
            raise
        except (TypeError, ValueError, AssertionError) as exc:
            raise error(path, f"building {type_name} failed: {exc}") from exc


def _arguments(cfg: dict, path: str, default_args: dict) -> tuple[str, Callable, dict, dict]:
    """(type name, factory, keyword arguments, type hints) of ``cfg``, with its type and argument names checked."""
    if "type" not in cfg:
        raise error(path, f"missing 'type' (one of the registered names, e.g. {', '.join(sorted(_REGISTRY)[:5])}, ...)")
    type_name = cfg["type"]
    if not isinstance(type_name, str) or type_name not in _REGISTRY:
        raise error(_join(path, "type"), f"unknown type '{type_name}'{closest(type_name, _REGISTRY)}")
    factory = _REGISTRY[type_name]
    kwargs = {k: v for k, v in cfg.items() if k != "type"}
    for k, v in default_args.items():
        kwargs.setdefault(k, v)

    params = inspect.signature(factory).parameters
    accepts_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"]
    for key in kwargs:
        if key not in params and not accepts_var_kw:
            raise error(_join(path, key), f"unknown argument of {type_name}{closest(key, named)} "
                        f"(valid: {', '.join(named)})")
    for name in named:
        p = params[name]
        if p.default is p.empty and name not in kwargs and p.kind is not p.VAR_POSITIONAL:
            raise error(_join(path, name), f"missing required argument of {type_name}")
    return type_name, factory, kwargs, _hints(factory)


def check(cfg: Any, path: str | None = None, **default_args) -> None:
    """Check ``cfg`` as :func:`build` would, without building it: its type and argument names, the keys of dataclass
    arguments, the types of plain values, and nested ``type`` dicts recursively (arguments named ``*_cfg`` are left
    to their owner). For components too costly to build up front (a dataset reads its annotations).

    Raises:
        ConfigError: as :func:`build`.
    """
    if cfg is None or not isinstance(cfg, dict):
        return
    path = current_path() if path is None else path
    type_name, factory, kwargs, hints = _arguments(cfg, path, default_args)
    for key, value in kwargs.items():
        sub = _join(path, key)
        hint = hints.get(key, Any)
        dc = _dataclass_of(hint)
        if dc is not None and isinstance(value, dict):
            build_dataclass(dc, value, sub)
        elif isinstance(value, dict) and "type" in value and not _kept_as_dict(factory, key):
            check(value, sub)
        elif isinstance(value, list) and any(isinstance(v, dict) and "type" in v for v in value) \
                and not _kept_as_dict(factory, key):
            for i, v in enumerate(value):
                check(v, _join(sub, i))
        elif not _is_built(value) and not _matches(value, hint):
            raise error(sub, f"{type_name} expects {_describe(hint)}, got {value!r}")


def _kept_as_dict(factory, key: str) -> bool:
    """Whether argument ``key`` of ``factory`` is passed on as a config dict for the factory to build."""
    return key.endswith("_cfg") or key in getattr(factory, "config_args", ())


def _is_built(value) -> bool:
    return not isinstance(value, (dict, list, tuple, str, int, float, bool, type(None)))


def _build_nested(value, path: str, skip: bool):
    if skip:
        return value
    if isinstance(value, dict) and "type" in value:
        return build(value, path)
    if isinstance(value, list) and any(isinstance(v, dict) and "type" in v for v in value):
        return [_build_nested(v, _join(path, i), False) for i, v in enumerate(value)]
    return value
