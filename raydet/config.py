"""Pipeline files: YAML with ``_base_`` inheritance, ``${...}`` references and ``--set`` overrides.

A pipeline is a YAML mapping of sections (:data:`SECTIONS`). ``load_config`` turns it into a :class:`Config`:

1. ``_base_: [a.yaml, b.yaml]`` (or one string; paths relative to the including file) are loaded recursively and
   merged left to right, then the file itself on top. Mappings merge key by key; anything else (lists included)
   is replaced whole; a mapping with ``_delete_: true`` replaces the inherited one instead of merging into it. What
   a file inherits is what its own bases set and, when the file is itself a base listed after others, what those
   earlier bases set: ``_base_: [faster_rcnn.yaml, hrnet_w32.yaml]`` with ``backbone: {_delete_: true, type:
   HRNet}`` in ``hrnet_w32.yaml`` replaces faster_rcnn.yaml's ResNet (a marker with nothing to replace in its own
   file's bases is kept until a merge it can act on, then dropped).
2. ``--set a.b.c=value`` overrides are applied; each value is parsed as YAML (``0.1`` a float, ``[1, 2]`` a list,
   ``null`` None, ``1/9`` a string). A mapping merges into the mapping at that key, as a child file's would, unless
   it has ``_delete_: true`` or sets another ``type`` (then it replaces it): :func:`merges_into`.
3. References are resolved: a string that is exactly ``${a.b[0]}`` becomes a copy of that value of the merged
   pipeline (any type); ``${...}`` inside a longer string is interpolated. A top-level key that is not a section
   must be used by some reference: it is a variable (``train_pipeline``, ``img_scale``), dropped once resolved.

Every key remembers the file that last set it (``Config.origins``), so errors read like::

    pipelines/retinanet.yaml: model.backbone.depht: unknown argument of ResNet; did you mean 'depth'?
"""
from __future__ import annotations

import copy
import os
import re
from typing import Any, Callable, Iterable

import yaml

from .registry import ConfigError, build, build_context, closest, error

__all__ = ["SECTIONS", "Config", "load_config", "get_by_path", "set_by_path", "parse_path", "format_path",
           "differences", "parse_yaml", "apply_override", "merges_into", "FLOAT_EXP"]

# Top-level keys a pipeline may define. Any other top-level key must be used as a ``${...}`` variable.
SECTIONS = ("model", "data", "optimizer", "lr_schedule", "train", "evaluation", "hooks", "scaling", "runtime",
            "work_dir", "seed", "checkpoint")

# Sections whose every key has a default: a pipeline may leave them out, and `--set <section>.<key>=...` creates them
DEFAULTED_SECTIONS = ("train", "evaluation", "scaling", "checkpoint", "runtime")

SET_ORIGIN = "--set"  # the origin recorded for keys set on the command line

_MISSING = object()
_REF = re.compile(r"\$\{([^${}]*)\}")
_PATH = re.compile(r"[^.\[\]\s]+(?:\[\d+\])*(?:\.[^.\[\]\s]+(?:\[\d+\])*)*")
_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
# YAML 1.1 reads ``1e-4`` (no dot, or an unsigned exponent) as a string; pipelines mean a float.
# YAML 1.1 reads 1e-4 as a string; floats in exponent notation without a dot are floats here (shared with tune's
# writer, so what it writes reads back the same)
FLOAT_EXP = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_SCALARS = (str, int, float, bool, type(None))


# ----------------------------------------------------------------------------------------------------------
# YAML reading and writing.

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float and rejects a key defined twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r} (first defined on line {first.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, flow-style lists of scalars, no anchors."""

    def ignore_aliases(self, data):
        return True


def _represent_list(dumper, data):
    flow = all(isinstance(v, _SCALARS) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", list(data), flow_style=flow)


for _cls in (_Loader, _Dumper):  # the dumper must quote strings that the loader would read as floats
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_EXP, list("-+0123456789"))
_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(tuple, _represent_list)


def parse_yaml(text: str, file: str):
    """YAML ``text`` (``1e-4`` a float), a syntax error raised as ConfigError naming ``file`` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = "; ".join(s for s in (exc.context, exc.problem) if s)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{file}: {where}invalid YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: invalid YAML: {exc}") from None


# ----------------------------------------------------------------------------------------------------------
# Dotted key paths: ``a.b[0].c`` or ``a.b.0.c``.

def parse_path(dotted: str) -> list[str | int]:
    """``"a.b[0].c"`` -> ``["a", "b", 0, "c"]``; ``"a.b.0"`` keeps ``"0"`` (an index when it meets a list)."""
    if not isinstance(dotted, str) or not _PATH.fullmatch(dotted):
        raise ConfigError(f"{dotted}: malformed key path (expected e.g. 'model.backbone.depth' or 'a.b[0]')")
    return [name if index == "" else int(index) for name, index in _TOKEN.findall(dotted)]


def format_path(tokens: Iterable[str | int]) -> str:
    """``["a", "b", 0, "c"]`` -> ``"a.b[0].c"`` (the form used by ``Config.origins`` and error messages)."""
    out = ""
    for t in tokens:
        out = f"{out}[{t}]" if isinstance(t, int) else (f"{out}.{t}" if out else str(t))
    return out


def _step(node, token, walked: list) -> tuple[Any, Any]:
    """(key, child) of ``node`` for ``token``; ConfigError naming the path and the nearest keys if absent."""
    here = format_path(walked)
    if isinstance(node, dict):
        if token in node:
            return token, node[token]
        if isinstance(token, str) and token.isdigit() and int(token) in node:
            return int(token), node[int(token)]
        where = f"in '{here}'" if here else "at the top level"
        raise ConfigError(f"{format_path([*walked, token])}: no key '{token}' {where}{closest(token, node)}")
    if isinstance(node, list):
        index = token if isinstance(token, int) else int(token) if token.isdigit() else None
        if index is None:
            raise ConfigError(f"{format_path([*walked, token])}: '{here}' is a list; index it with a number")
        if index >= len(node):
            raise ConfigError(f"{format_path([*walked, index])}: index {index} out of range "
                              f"('{here}' has {len(node)} items)")
        return index, node[index]
    raise ConfigError(f"{format_path([*walked, token])}: '{here}' is a {type(node).__name__}, "
                      f"not a mapping or a list")


def get_by_path(data, dotted: str, default: Any = _MISSING):
    """The value at ``dotted`` in nested dicts / lists; ``default`` (or a ConfigError) if it does not exist."""
    node, walked = data, []
    for token in parse_path(dotted):
        try:
            key, node = _step(node, token, walked)
        except ConfigError:
            if default is _MISSING:
                raise
            return default
        walked.append(key)
    return node


def differences(a, b, path: str = "") -> list[str]:
    """Dotted paths where two resolved pipelines (or parts of them at ``path``) differ; a mapping of the same
    ``type`` on both sides reports its changed keys, anything else the path itself."""
    if isinstance(a, dict) and isinstance(b, dict) and a.get("type") == b.get("type"):
        out = []
        for k in dict.fromkeys([*a, *b]):
            sub = format_path([path, k]) if path else str(k)
            if k not in a or k not in b:
                out.append(sub)
            else:
                out.extend(differences(a[k], b[k], sub))
        return out
    return [] if a == b else [path]


def set_by_path(data, dotted: str, value: Any) -> str:
    """Set ``dotted`` to ``value`` in place and return the path in canonical form (``a.b[0].c``).

    Every parent must exist (ConfigError with the nearest keys otherwise); the last key may be new when its
    parent is a mapping, and must be an existing index when its parent is a list.
    """
    tokens = parse_path(dotted)
    node, walked = data, []
    for token in tokens[:-1]:
        key, node = _step(node, token, walked)
        walked.append(key)
    last = tokens[-1]
    if isinstance(node, dict):
        if isinstance(last, str) and last not in node and last.isdigit() and int(last) in node:
            last = int(last)
        node[last] = value
    else:
        last, _ = _step(node, last, walked)  # lists: only existing indices
        node[last] = value
    return format_path([*walked, last])


# ----------------------------------------------------------------------------------------------------------
# Origins: {dotted path -> file} for every node (mappings, lists, their items).

def _forget(origins: dict, path: str) -> None:
    for key in [k for k in origins if k == path or k.startswith((path + ".", path + "["))]:
        del origins[key]


def _record(origins: dict, path: str, value, origin_of: Callable[[str], str]) -> None:
    origins[path] = origin_of(path)
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "_delete_":
                continue
            _record(origins, format_path([path, k]) if path else str(k), v, origin_of)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _record(origins, f"{path}[{i}]", v, origin_of)


def _lookup(origins: dict, path: str, default=None):
    """The origin of ``path`` or of its closest recorded parent."""
    while path:
        if path in origins:
            return origins[path]
        path = path[:path.rindex("[")] if path.endswith("]") else (path.rsplit(".", 1)[0] if "." in path else "")
    return default


def _error(path: str, message: str, file: str | None, origins: dict) -> ConfigError:
    with build_context("", file=file, origins=origins):
        return error(path, message)


# ----------------------------------------------------------------------------------------------------------
# Loading and merging files.

def _strip_delete(value, path: str, file_of: Callable[[str], str]):
    """A deep copy of ``value`` without ``_delete_`` markers (checking that they are booleans)."""
    if isinstance(value, dict):
        if "_delete_" in value and not isinstance(value["_delete_"], bool):
            raise ConfigError(f"{file_of(path)}: {format_path([path, '_delete_'])}: expected true or false, "
                              f"got {value['_delete_']!r}")
        return {k: _strip_delete(v, format_path([path, k]), file_of) for k, v in value.items() if k != "_delete_"}
    if isinstance(value, list):
        return [_strip_delete(v, f"{path}[{i}]", file_of) for i, v in enumerate(value)]
    return copy.deepcopy(value)


def _copy_keeping_markers(value, path: str, file_of: Callable[[str], str], drop_top: bool):
    """A deep copy of ``value`` that keeps its ``_delete_: true`` markers (they act when this value is merged over
    what a later includer inherits: see the module docstring), the top one dropped when ``drop_top`` (it has just
    replaced an inherited value); ``_delete_: false`` markers are dropped; each marker must be a boolean."""
    if isinstance(value, dict):
        if "_delete_" in value and not isinstance(value["_delete_"], bool):
            raise ConfigError(f"{file_of(path)}: {format_path([path, '_delete_'])}: expected true or false, "
                              f"got {value['_delete_']!r}")
        return {k: (v if k == "_delete_" else _copy_keeping_markers(v, format_path([path, k]), file_of, False))
                for k, v in value.items() if k != "_delete_" or (v is True and not drop_top)}
    if isinstance(value, list):
        return [_strip_delete(v, f"{path}[{i}]", file_of) for i, v in enumerate(value)]
    return copy.deepcopy(value)


def _merge(dst: dict, origins: dict, src: dict, origin_of: Callable[[str], str], path: str = "") -> None:
    """Merge ``src`` into ``dst`` in place; ``origin_of(path)`` names the file that set a key of ``src``."""
    for key, value in src.items():
        if not path and isinstance(key, str) and key.startswith("_"):
            continue  # _base_ and other private top-level keys are not kept
        sub = format_path([path, key]) if path else str(key)
        if isinstance(value, dict):
            delete = value.get("_delete_", False)
            if not isinstance(delete, bool):
                raise ConfigError(f"{origin_of(sub)}: {sub}._delete_: expected true or false, got {delete!r}")
            if not delete and isinstance(dst.get(key), dict):
                origins[sub] = origin_of(sub)  # a mapping's origin is the last file that set a key in it
                _merge(dst[key], origins, {k: v for k, v in value.items() if k != "_delete_"}, origin_of, sub)
                continue
        _forget(origins, sub)
        dst[key] = _copy_keeping_markers(value, sub, origin_of, drop_top=key in dst)
        _record(origins, sub, dst[key], origin_of)


def _load_file(path: str, chain: tuple[str, ...], included_by: str | None, used: set) -> tuple[dict, dict]:
    """(merged data, origins) of one pipeline file and its bases; adds the top-level names that any of the files
    references to ``used``."""
    real = os.path.realpath(path)
    reals = [os.path.realpath(p) for p in chain]
    if real in reals:
        cycle = " -> ".join([*chain[reals.index(real):], path])
        raise ConfigError(f"{included_by}: _base_: inheritance cycle: {cycle}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if included_by:
            raise ConfigError(f"{included_by}: _base_: file not found: {path}") from None
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None

    doc = parse_yaml(text, path)
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(doc).__name__}")
    bases = doc.get("_base_") or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_: expected a file name or a list of file names, got {bases!r}")

    data, origins = {}, {}
    for base in bases:
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), os.path.expanduser(base)))
        base_data, base_origins = _load_file(base_path, (*chain, path), path, used)
        _merge(data, origins, base_data, lambda p, o=base_origins, b=base_path: _lookup(o, p, b))
    _merge(data, origins, doc, lambda p: path)
    used.update(_top_names(doc))
    return data, origins


# ----------------------------------------------------------------------------------------------------------
# Overrides, the top-level check and reference resolution.

def merges_into(current, value) -> bool:
    """Whether an override ``value`` merges into ``current`` (the rule of ``--set`` and of tune fragments): both are
    mappings, ``value`` has no ``_delete_: true`` and sets no other ``type``; otherwise it replaces ``current``."""
    return (isinstance(current, dict) and isinstance(value, dict) and value.get("_delete_", False) is not True
            and value.get("type", current.get("type")) == current.get("type"))


def _merge_override(dst: dict, src: dict, path: str, origins: dict) -> None:
    """Merge the ``--set`` mapping ``src`` into ``dst`` in place, key by key (:func:`merges_into` at every level)."""
    set_origin = lambda p: SET_ORIGIN  # noqa: E731
    for key, value in src.items():
        if key == "_delete_":
            continue
        sub = format_path([path, key])
        if merges_into(dst.get(key), value):
            origins[sub] = SET_ORIGIN
            _merge_override(dst[key], value, sub, origins)
            continue
        _forget(origins, sub)
        dst[key] = _strip_delete(value, sub, set_origin)
        _record(origins, sub, dst[key], set_origin)


def apply_override(data: dict, origins: dict, text: str) -> None:
    """Apply one ``--set KEY=VALUE`` to ``data`` in place (VALUE parsed as YAML), recording its origin.

    A mapping VALUE merges into the mapping at KEY, key by key and recursively (``--set
    'model.backbone={depth: 101}'`` changes one argument), as tune fragments do; it replaces the mapping when it has
    ``_delete_: true`` or sets another ``type``. Any other VALUE replaces what is at KEY.
    """
    key, sep, raw = str(text).partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{SET_ORIGIN}: expected KEY=VALUE, got {text!r}")
    if key.startswith("_"):
        raise ConfigError(f"{SET_ORIGIN}: {key}: top-level keys starting with '_' are not kept in a pipeline")
    value = parse_yaml(raw, f"{SET_ORIGIN} {key}")
    section = parse_path(key)[0]
    if section in DEFAULTED_SECTIONS and section not in data and "." in key:
        # `--set scaling.num_workers=8` on a pipeline that leaves `scaling:` at its defaults
        data[section] = {}
        origins[section] = SET_ORIGIN
    try:
        if isinstance(value, dict) and not isinstance(value.get("_delete_", False), bool):
            raise ConfigError(f"{key}._delete_: expected true or false, got {value['_delete_']!r}")
        current = get_by_path(data, key, None)
        if merges_into(current, value):
            path = set_by_path(data, key, current)  # the canonical path; the mapping stays and is merged into
            origins[path] = SET_ORIGIN
            _merge_override(current, value, path, origins)
        else:
            value = _strip_delete(value, key, lambda p: SET_ORIGIN)
            path = set_by_path(data, key, value)
            _forget(origins, path)
            _record(origins, path, value, lambda p: SET_ORIGIN)
    except ConfigError as exc:
        if str(exc).startswith(f"{SET_ORIGIN}: "):
            raise
        raise ConfigError(f"{SET_ORIGIN}: {exc}") from None
    parent = path
    while parent := (parent[:parent.rindex("[")] if parent.endswith("]") else parent.rpartition(".")[0]):
        origins[parent] = SET_ORIGIN


def _references(value) -> Iterable[str]:
    """The text inside every ``${...}`` of the strings in ``value``."""
    if isinstance(value, str):
        for m in _REF.finditer(value):
            yield m.group(1).strip()
    elif isinstance(value, dict):
        for v in value.values():
            yield from _references(v)
    elif isinstance(value, list):
        for v in value:
            yield from _references(v)


def _top_names(value) -> set[str]:
    """The top-level keys that the references in ``value`` start from."""
    return {re.split(r"[.\[]", ref, maxsplit=1)[0] for ref in _references(value)}


def _check_top_level(data: dict, origins: dict, file: str | None, used: set) -> None:
    """Every top-level key is a section or a variable that some file of the pipeline (or --set) refers to.

    References in the files count even where a later file replaced them, so a child that overrides the only
    user of a base's variable does not make that variable an error.
    """
    for key in data:
        if key not in SECTIONS and key not in used:
            raise _error(str(key), f"unknown top-level key '{key}'{closest(key, SECTIONS)} (sections: "
                         f"{', '.join(SECTIONS)}; any other top-level key must be used as a ${{{key}}} variable)",
                         file, origins)


def _has_ref(value) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, dict):
        return any(_has_ref(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_ref(v) for v in value)
    return False


class _Resolver:
    """Replaces ``${...}`` references in place, depth first, detecting cycles."""

    def __init__(self, data: dict, origins: dict, file: str | None):
        self.data, self.origins, self.file = data, origins, file
        self.active: list[str] = []  # paths being resolved, outermost first

    def error(self, path: str, message: str) -> ConfigError:
        return _error(path, message, self.file, self.origins)

    def run(self) -> None:
        for key in list(self.data):
            self.resolve_at(self.data, key, str(key))

    def resolve_at(self, parent, key, path: str):
        """Resolve ``parent[key]`` (found at ``path``) in place and return it."""
        value = parent[key]
        if not _has_ref(value):
            return value
        if path in self.active:
            cycle = " -> ".join([*self.active[self.active.index(path):], path])
            raise self.error(path, f"reference cycle: {cycle}")
        self.active.append(path)
        try:
            if isinstance(value, dict):
                for k in list(value):
                    self.resolve_at(value, k, format_path([path, k]))
            elif isinstance(value, list):
                for i in range(len(value)):
                    self.resolve_at(value, i, f"{path}[{i}]")
            else:
                parent[key] = self.resolve_string(value, path)
        finally:
            self.active.pop()
        return parent[key]

    def resolve_string(self, text: str, path: str):
        if "${" in _REF.sub("", text):
            raise self.error(path, f"malformed reference in {text!r} (expected ${{dotted.key}})")
        whole = _REF.fullmatch(text)
        if whole:
            value, target = self.lookup(whole.group(1), path)
            for k, f in list(self.origins.items()):  # the copied keys keep the files that defined them
                if k.startswith((target + ".", target + "[")):
                    self.origins[path + k[len(target):]] = f
            return copy.deepcopy(value)

        def interpolate(m):
            value, _ = self.lookup(m.group(1), path)
            if not isinstance(value, _SCALARS):
                raise self.error(path, f"cannot insert ${{{m.group(1).strip()}}} (a {type(value).__name__}) "
                                       f"into the string {text!r}")
            return str(value)

        return _REF.sub(interpolate, text)

    def lookup(self, ref: str, path: str) -> tuple[Any, str]:
        """(resolved value, canonical path) of the reference ``ref`` made at ``path``."""
        ref = ref.strip()
        try:
            tokens = parse_path(ref)
        except ConfigError:
            raise self.error(path, f"malformed reference ${{{ref}}}") from None
        node, walked = self.data, []
        for i, token in enumerate(tokens):
            try:
                key, child = _step(node, token, walked)
            except ConfigError as exc:
                raise self.error(path, f"reference ${{{ref}}} not found: {exc}") from None
            walked.append(key)
            # Resolve the target itself, and intermediate strings (references to mappings); not whole
            # intermediate mappings, which may contain the reference being resolved.
            if i == len(tokens) - 1 or isinstance(child, str):
                child = self.resolve_at(node, key, format_path(walked))
            node = child
        return node, format_path(walked)


def _finalize(raw: dict, raw_origins: dict, used: set, overrides: Iterable[str], file: str | None) -> "Config":
    data, origins = copy.deepcopy(raw), dict(raw_origins)
    overrides = tuple(overrides)
    for text in overrides:
        apply_override(data, origins, text)
    used = used | _top_names(data)
    _Resolver(data, origins, file).run()  # a misspelt reference is reported before the key it missed
    _check_top_level(data, origins, file, used)
    for key in [k for k in data if k not in SECTIONS]:  # variables have served their purpose
        del data[key]
        _forget(origins, str(key))
    cfg = Config(data, path=file, origins=origins)
    cfg._source = (raw, raw_origins, used, overrides)
    return cfg


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> "Config":
    """Load a pipeline file with its bases, apply ``KEY=VALUE`` overrides and resolve references."""
    path = os.fspath(path)
    used: set[str] = set()
    raw, origins = _load_file(path, (), None, used)
    raw = _strip_delete(raw, "", lambda p: path)  # the markers left had nothing to replace
    return _finalize(raw, origins, used, overrides, path)


# ----------------------------------------------------------------------------------------------------------

class Config:
    """A fully merged and resolved pipeline.

    Attributes:
        data: plain nested dicts / lists, top-level keys among :data:`SECTIONS`.
        path: the pipeline file (None when built from a dict).
        origins: ``{dotted path -> file}``: the file (or ``"--set"``) that last set each key; for a mapping,
            the last file that set a key inside it (the likeliest cause of, e.g., a missing argument).
    """

    def __init__(self, data: dict | None = None, path: str | None = None, origins: dict | None = None):
        self.data = {} if data is None else data
        self.path = path
        self.origins = {} if origins is None else origins
        self._source = (copy.deepcopy(self.data), dict(self.origins), set(), ())

    def get(self, dotted: str, default: Any = None):
        return get_by_path(self.data, dotted, default)

    def __getitem__(self, dotted: str):
        try:
            return get_by_path(self.data, dotted)
        except ConfigError as exc:
            raise KeyError(str(exc)) from None

    def __contains__(self, dotted: str) -> bool:
        absent = object()
        return get_by_path(self.data, dotted, absent) is not absent

    def __repr__(self) -> str:
        return f"Config(path={self.path!r}, sections={list(self.data)})"

    def with_overrides(self, overrides: Iterable[str]) -> "Config":
        """A new Config with more ``KEY=VALUE`` overrides applied before references are resolved, so that
        overriding a variable (``img_scale=[640, 640]``) changes every key that uses it."""
        raw, origins, used, previous = self._source
        return _finalize(raw, origins, used, (*previous, *overrides), self.path)

    def to_yaml(self) -> str:
        """The merged, resolved pipeline as YAML (keys in insertion order); ``load_config`` reads it back."""
        return yaml.dump(self.data, Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                         default_flow_style=False, width=100)

    def dump(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_yaml())

    def build(self, dotted: str, **default_args):
        """Build the object configured at ``dotted`` (e.g. ``"model"``); errors name the defining file."""
        with build_context(dotted, file=self.path, origins=self.origins):
            return build(self.get(dotted), dotted, **default_args)
