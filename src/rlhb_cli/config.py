"""Stage configs: one typed dataclass per stage; a YAML recipe fills it, CLI flags override it.

Every field carries its help text in `metadata["help"]`; the CLI reads it from there, so a field is
documented once. `__post_init__` validates and says how to fix a bad value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from rlhb_cli.errors import RlhbError


def field(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None, **kw: Any) -> Any:
    """A dataclass field with help text (the CLI and the docs read it)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def help_of(config_cls: type, name: str) -> str:
    return config_cls.__dataclass_fields__[name].metadata["help"]


def _coerce(value: Any, annotation: Any, name: str, source: str) -> Any:
    """Turn a YAML/CLI value into the field's declared type, or say which key is wrong."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name, source)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RlhbError(f"{source}: '{name}' must be a list, got {value!r}")
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return [_coerce(v, item, name, source) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise RlhbError(f"{source}: '{name}' must be a mapping, got {value!r}")
        return dict(value)
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1"):
                return True
            if str(value).lower() in ("false", "no", "0"):
                return False
            raise ValueError
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
        if annotation is Path:
            return Path(value)
    except (TypeError, ValueError):
        raise RlhbError(f"{source}: '{name}' must be {annotation.__name__}, got {value!r}") from None
    return value


def build_config(config_cls: type, recipe: Path | None = None, overrides: dict[str, Any] | None = None):
    """Defaults < YAML recipe < CLI overrides (only the flags the user gave, i.e. not None)."""
    known = {f.name: f for f in dataclasses.fields(config_cls)}
    types_of = typing.get_type_hints(config_cls)  # the modules use `from __future__ import annotations`
    values: dict[str, Any] = {}
    if recipe is not None:
        try:
            loaded = yaml.safe_load(Path(recipe).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise RlhbError(f"{recipe}: no such recipe file") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise RlhbError(f"{recipe}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(loaded, dict):
            raise RlhbError(f"{recipe}: a recipe is a mapping of config keys, got {type(loaded).__name__}")
        unknown = sorted(set(loaded) - set(known))
        if unknown:
            raise RlhbError(
                f"{recipe}: unknown key(s) {', '.join(unknown)} for {config_cls.__name__}; "
                f"known: {', '.join(sorted(known))}"
            )
        for name, value in loaded.items():
            values[name] = _coerce(value, types_of[name], name, str(recipe))
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in known:
            raise RlhbError(f"unknown option '{name}' for {config_cls.__name__}")
        values[name] = _coerce(value, types_of[name], name, f"--{name.replace('_', '-')}")
    try:
        return config_cls(**values)
    except RlhbError:
        raise
    except (TypeError, ValueError) as exc:
        raise RlhbError(f"{config_cls.__name__}: {exc}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a config (Paths become strings) for the manifest."""
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def same_config(recorded: dict[str, Any] | None, config: Any) -> bool:
    """Whether a stage recorded with `recorded` ran with `config`. A field added to the config since then
    counts as the same when it is at its default, so a newer rlhb does not redo finished stages."""
    if recorded is None:
        return False
    current = config_to_dict(config)
    for f in dataclasses.fields(config):
        if f.name in recorded or f.name not in current:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if default is dataclasses.MISSING:
            return False
        if current[f.name] != (str(default) if isinstance(default, Path) else default):
            return False
        recorded = {**recorded, f.name: current[f.name]}
    return recorded == current
