"""Loading the config tree from YAML with dotted CLI overrides, and its one-line error messages.

    cfg = load_config("configs/default.yaml", ["grpo.eps_high=0.3", "run.steps=4"])

A bad key, type or value raises :class:`ConfigError` with one line naming the
key path, the bad value and what is allowed (and the nearest valid key for a typo).
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from verimed.core.config.base import ConfigError
from verimed.core.config.schema import Config, check_backends
from verimed.core.config.stages import StageError, validate_stages


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (YAML) and apply ``section.key=value`` overrides; validate all."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    return from_dict(raw, source=str(path) if path else "<overrides>")


def apply_override(raw: dict[str, Any], override: str) -> None:
    """``"a.b.c=value"`` -> raw["a"]["b"]["c"] = yaml(value)."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected section.key=value")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def from_dict(raw: dict[str, Any], source: str = "<config>") -> Config:
    try:
        cfg = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_explain(str(exc), raw)}") from None
    try:
        validate_stages(cfg.stages, cfg.grpo, cfg.rollout, cfg.run.steps)
    except StageError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    try:
        check_backends(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return msgspec.to_builtins(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _explain(message: str, raw: dict[str, Any]) -> str:
    """Turn msgspec's "... - at `$.a.b`" into "a.b = value: problem (allowed / did you mean)"."""
    problem, _, where = message.rpartition(" - at `")
    if not problem:
        problem, where = message, "$`"
    if where.startswith("key` in `"):  # a mapping's key has the wrong type, e.g. emulation.engine_slowdown
        where = where[len("key` in `"):]
        problem = f"every key {problem[0].lower()}{problem[1:]}"
    path = [p for p in re.split(r"\.|\[|\]", where.rstrip("`").lstrip("$")) if p]
    unknown = re.match(r"Object contains unknown field `(.+)`", problem)
    if unknown:
        key = unknown.group(1)
        section = _section_type(path)
        dotted = ".".join(path + [key])
        hint = ""
        if section is not None:
            valid = [f.encode_name for f in msgspec.structs.fields(section)]
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean `{'.'.join(path + [close[0]])}`?)" if close else f"; valid keys: {', '.join(valid)}"
        return f"{dotted}: unknown key{hint}"
    value = _lookup(raw, path)
    if problem.startswith("Invalid enum value"):
        allowed = _literal_choices(path)
        if allowed:
            problem = "expected one of " + ", ".join(repr(a) for a in allowed)
    return f"{'.'.join(path) or '<root>'} = {value!r}: {problem.replace('Expected', 'expected')}"


def _lookup(raw: Any, path: list[str]) -> Any:
    for part in path:
        if isinstance(raw, dict):
            raw = raw.get(part)
        elif isinstance(raw, list) and part.isdigit() and int(part) < len(raw):
            raw = raw[int(part)]
        else:
            return None
    return raw


def _literal_choices(path: list[str]) -> tuple[Any, ...]:
    """The allowed values of the Literal field at ``path`` (empty if it is not one)."""
    section = _section_type(path[:-1]) if path else None
    if section is None:
        return ()
    field = {f.encode_name: f.type for f in msgspec.structs.fields(section)}.get(path[-1])
    return getattr(field, "__args__", ()) if getattr(field, "__origin__", None) is Literal else ()


def _section_type(path: list[str]) -> type | None:
    node: Any = Config
    for part in path:
        fields = {f.encode_name: f.type for f in msgspec.structs.fields(node)}
        node = fields.get(part)
        if not (isinstance(node, type) and issubclass(node, msgspec.Struct)):
            return None
    return node
