"""Stage configs: one typed dataclass per stage; a YAML recipe fills it, CLI flags override it.

Every field carries its help text in `metadata["help"]`; the CLI reads it from there, so a field is
documented once. `__post_init__` validates and says how to fix a bad value. A config may nest groups of
settings (the PPO engine's `ppo`, `kl`, `shaping`, `lora`, `probe`, as lm-human-preference-details nests
its own), read in code as `config.kl.coef`; their fields keep flat names outside (`--kl-coef`, the YAML
key `kl_coef`, the manifest's `kl_coef`), so recipes and recorded runs read the same as before.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from rlhb_cli.errors import RlhbError


def field(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None, flat: str | None = None,
          **kw: Any) -> Any:
    """A dataclass field with help text (the CLI and the docs read it); `flat`: its flag and key when it
    sits in a group under a shorter name (`coef` in `kl` is `kl_coef`)."""
    metadata = {"help": help, **({"flat": flat} if flat else {})}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


def group(factory: Callable[[], Any], *, help: str, help_overrides: dict[str, str] | None = None) -> Any:
    """A nested group of settings (a dataclass made by `factory`, which a subclass may replace to change its
    defaults); `help_overrides` rewords a field's help for this config, by flat name."""
    return dataclasses.field(default_factory=factory,
                             metadata={"group": True, "help": help, "help_overrides": help_overrides or {}})


@dataclasses.dataclass(frozen=True)
class FlatField:
    """One setting as the outside sees it: flag / key `name`, found in the config at `path`."""

    name: str
    path: tuple[str, ...]  # ("seed",) or ("kl", "coef")
    annotation: Any
    default: Any  # dataclasses.MISSING when required
    help: str


def flat_fields(config_cls: type) -> dict[str, FlatField]:
    """Every setting of a config by its flat name, groups opened in place, in declaration order."""
    hints = typing.get_type_hints(config_cls)  # the modules use `from __future__ import annotations`
    found: dict[str, FlatField] = {}
    for f in dataclasses.fields(config_cls):
        if f.metadata.get("group"):
            defaults = f.default_factory()
            inner = typing.get_type_hints(type(defaults))
            for sub in dataclasses.fields(defaults):
                name = sub.metadata.get("flat", sub.name)
                found[name] = FlatField(name, (f.name, sub.name), inner[sub.name], getattr(defaults, sub.name),
                                        f.metadata["help_overrides"].get(name, sub.metadata.get("help", "")))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        found[f.name] = FlatField(f.name, (f.name,), hints[f.name], default, f.metadata.get("help", ""))
    return found


def help_of(config_cls: type, name: str) -> str:
    return flat_fields(config_cls)[name].help


def flat_value(config: Any, field_: FlatField) -> Any:
    value = config
    for part in field_.path:
        value = getattr(value, part)
    return value


def _construct(config_cls: type, values: dict[str, Any], known: dict[str, FlatField]) -> Any:
    """The config from flat values: a group's values replace those of its default (the config's own)."""
    top: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        path = known[name].path
        if len(path) == 2:
            groups.setdefault(path[0], {})[path[1]] = value
        else:
            top[name] = value
    for name, changed in groups.items():
        top[name] = dataclasses.replace(config_cls.__dataclass_fields__[name].default_factory(), **changed)
    return config_cls(**top)


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
    """Defaults < YAML recipe < CLI overrides (only the flags the user gave, i.e. not None); keys are flat."""
    known = flat_fields(config_cls)
    types_of = {name: f.annotation for name, f in known.items()}
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
        return _construct(config_cls, values, known)
    except RlhbError:
        raise
    except (TypeError, ValueError) as exc:
        raise RlhbError(f"{config_cls.__name__}: {exc}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready flat dict of a config (groups opened, Paths as strings) for the manifest."""
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return plain(dataclasses.asdict(v))
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {name: plain(flat_value(config, f)) for name, f in flat_fields(type(config)).items()}


def same_config(recorded: dict[str, Any] | None, config: Any) -> bool:
    """Whether a stage recorded with `recorded` ran with `config`. A field added to the config since then
    counts as the same when it is at its default, so a newer rlhb does not redo finished stages."""
    if recorded is None:
        return False
    current = config_to_dict(config)
    for f in flat_fields(type(config)).values():
        if f.name in recorded or f.name not in current:
            continue
        if f.default is dataclasses.MISSING:
            return False
        if current[f.name] != (str(f.default) if isinstance(f.default, Path) else f.default):
            return False
        recorded = {**recorded, f.name: current[f.name]}
    return recorded == current
