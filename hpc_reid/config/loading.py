"""Reading configs: YAML files with ``_base_`` chains, ``--set`` overrides, validation errors
that name the key; and writing the resolved config beside a run."""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from hpc_reid.atomic import write_atomic
from hpc_reid.config.base import ConfigError
from hpc_reid.config.schema import Config


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class that owns the key at ``loc[:-1]`` (None if not a fixed section)."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        if get_origin(ann) is not None:  # Optional[...] etc.: take the model member if any
            ann = next((a for a in get_args(ann) if isinstance(a, type)), None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _describe(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            section = _section_at(loc)
            prefix = ".".join(str(p) for p in loc[:-1])
            keys = list(section.model_fields) if section else []
            hint = ""
            if keys:  # matched on the key's own name: a shared "sampler." prefix is no likeness
                close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
                full = [f"{prefix}.{k}" if prefix else k for k in [*close, *keys]]
                hint = f" (did you mean {full[0]!r}?)" if close else f"; allowed: {', '.join(full)}"
            lines.append(f"  {path}: unknown key{hint}")
            continue
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] != "value_error":
            lines.append(f"  {path}: {message} (got {err['input']!r})")
        elif not loc or message.startswith(f"{path}."):  # a section's check names its own keys
            lines.append(f"  {message}")
        else:
            lines.append(f"  {path}: {message}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def _deep_merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file, resolving ``_base_`` chains (relative to the including file)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: _base_ cycle through {' -> '.join(map(str, _seen))}")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    return _deep_merge(read_yaml(path.parent / base, (*_seen, path)), data)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {assignment!r}: expected KEY.PATH=VALUE")
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"override {assignment!r}: {where} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = raw


def build_config(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def config_with_overrides(
    data: Mapping[str, Any], overrides: Iterable[str] = (), source: str = "<dict>"
) -> Config:
    """``data`` (a config mapping already read, e.g. the resolved config a checkpoint stores) with
    ``--set`` overrides applied and validated like a file; ``data`` itself is left unchanged."""
    data = copy.deepcopy(dict(data))
    overrides = list(overrides)
    for assignment in overrides:
        apply_override(data, assignment)
    return build_config(data, source + (f" with --set {' '.join(overrides)}" if overrides else ""))


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> Config:
    """Load ``path`` (or the defaults when None), apply ``--set`` overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    overrides = list(overrides)
    for assignment in overrides:
        apply_override(data, assignment)
    source = str(path or "<defaults>") + (f" with --set {' '.join(overrides)}" if overrides else "")
    return build_config(data, source)


def save_resolved(config: Config, run_dir: str | Path) -> Path:
    """Write the resolved config beside a run's outputs as ``config.yaml``."""
    return write_atomic(Path(run_dir) / "config.yaml", config.to_yaml())
