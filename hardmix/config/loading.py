"""Loading configs: YAML presets (with ``base`` inheritance), files, ``--set`` overrides, built
into the dataclasses (:func:`hardmix.config.schema.from_dict`, which rejects unknown keys and
wrong types) and validated (:func:`hardmix.config.rules.validate`).

Layers apply in order preset < file < overrides. A preset that names a ``base`` inherits it and
*replaces* any search ``space`` it defines (a derived preset states its own space); a ``--set
space.X.Y=...`` override *merges* into the space key by key (``space.augment.k.high=0.4`` changes
one bound and keeps the rest; ``space.augment.k=null`` removes the parameter).
"""

from __future__ import annotations

import dataclasses
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from hardmix.config.rules import validate
from hardmix.config.schema import RunConfig, SweepConfig, from_dict, one_of, strip_optional
from hardmix.errors import ConfigError

PRESET_PACKAGE = "hardmix.presets"
#: A YAML config larger than this is not a config (and would only be slow to parse).
MAX_CONFIG_BYTES = 1 << 20


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that names one key twice (PyYAML would silently keep the last value)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a repeated key instead of keeping the last one."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class says what is wrong
                break
            if first != key_node.start_mark.line + 1:
                raise DuplicateKeyError(f"duplicate key {key!r} (lines {first} and "
                                        f"{key_node.start_mark.line + 1})")
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys: every config and ``--set`` value."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(PRESET_PACKAGE).iterdir()
                  if p.name.endswith(".yaml"))


def _parse_yaml(text: str, where: str, field: str) -> dict:
    try:
        raw = safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(field, where, f"is not valid YAML ({first})") from None
    except (RecursionError, ValueError, OverflowError) as exc:
        raise ConfigError(field, where, f"is not a usable YAML config ({type(exc).__name__})") \
            from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(field, where, f"must hold a mapping of config keys, not a "
                                        f"{type(raw).__name__}")
    bad = [k for k in raw if not isinstance(k, str)]
    if bad:
        raise ConfigError(field, where, f"has a key that is not a name: {bad[0]!r}")
    return raw


def read_preset(name: str) -> dict:
    """The raw mapping of a preset, with its ``base`` chain merged in."""
    names = preset_names()
    if name not in names:
        raise ConfigError("preset", name, one_of(names, name))
    text = resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()
    return _resolve_base(_parse_yaml(text, name, "preset"), seen=(name,))


def read_yaml_file(path: str) -> dict:
    """A ``--config`` file: an existing, readable, UTF-8 YAML mapping of config keys."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", path, "must be an existing YAML file")
    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError("--config", path, f"is {size:,} bytes: not a config file (at most "
                                                f"{MAX_CONFIG_BYTES:,})")
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError("--config", path, f"is not UTF-8 text ({exc.reason} at byte "
                                            f"{exc.start})") from None
    except OSError as exc:
        raise ConfigError("--config", path, f"cannot be read ({exc.strerror})") from None
    return _resolve_base(_parse_yaml(text, path, "--config"), seen=(path,))


def _resolve_base(raw: dict, seen: tuple) -> dict:
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError("base", base, "must name a preset")
    if base in seen:
        raise ConfigError("base", base, f"forms a cycle through {' -> '.join(seen)}")
    names = preset_names()
    if base not in names:
        raise ConfigError("base", base, one_of(names, base))
    text = resources.files(PRESET_PACKAGE).joinpath(f"{base}.yaml").read_text()
    return deep_merge(_resolve_base(_parse_yaml(text, base, "base"), seen + (base,)), raw,
                      replace=("space",))


def preset_kind(raw: dict) -> str:
    """``sweep`` when a mapping describes a sweep (it has sweep-only keys), else ``run``."""
    sweep_only = {f.name for f in dataclasses.fields(SweepConfig)} - {"name", "description"}
    return "sweep" if sweep_only & set(raw) else "run"


def deep_merge(base: dict, top: dict, replace: tuple[str, ...] = ()) -> dict:
    """``top`` over ``base``, mappings merged key by key. Keys in ``replace`` are replaced
    whole; ``when`` conditions are always replaced whole. A None value inside ``space``
    removes that parameter."""
    out = dict(base)
    for key, value in top.items():
        if key in replace or key == "when":
            out[key] = value
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            merged = deep_merge(out[key], value)
            if key == "space":
                merged = {k: v for k, v in merged.items() if v is not None}
            out[key] = merged
        else:
            out[key] = value
    return out


def parse_overrides(pairs: list[str], cls: type | None = None) -> dict:
    """``["augment.alpha=0.5", ...]`` -> nested mapping; values are parsed as YAML scalars.

    With ``cls`` the key is read against the schema, so keys of mapping fields may hold dots:
    ``space.augment.k.high=0.5`` sets ``space["augment.k"]["high"]``.
    """
    out: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", pair, "must look like key=value, e.g. augment.alpha=0.5")
        try:
            value = safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        except (RecursionError, ValueError, OverflowError):
            raise ConfigError("--set", pair, "has a value that is not a YAML scalar or list") \
                from None
        parts = _split_key(cls, key.strip().split(".")) if cls else key.strip().split(".")
        if any(not p for p in parts):
            raise ConfigError("--set", pair, "has an empty part in its key")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("--set", pair, f"sets both {part} and a field inside it")
        node[parts[-1]] = value
    return out


def _split_key(cls: Any, parts: list[str]) -> list[str]:
    """Group dotted key parts by the schema: a mapping field's key keeps its dots."""
    if not parts or not dataclasses.is_dataclass(cls):
        return parts
    names = {f.name for f in dataclasses.fields(cls)}
    if parts[0] not in names:
        return parts
    tp = strip_optional(typing.get_type_hints(cls)[parts[0]])
    rest = parts[1:]
    if typing.get_origin(tp) is dict and rest:
        inner = typing.get_args(tp)[1]
        inner_names = ({f.name for f in dataclasses.fields(inner)}
                       if dataclasses.is_dataclass(inner) else set())
        for cut in range(len(rest) - 1, 0, -1):  # the longest key whose remainder is a field
            if rest[cut] in inner_names:
                return [parts[0], ".".join(rest[:cut])] + _split_key(inner, rest[cut:])
        return [parts[0], ".".join(rest)]
    return [parts[0]] + _split_key(tp, rest)


def load_config(cls: type, preset: str | None = None, file: str | None = None,
                overrides: list[str] | None = None) -> Any:
    """Build and validate a ``RunConfig`` or ``SweepConfig`` from preset < file < overrides.

    A sweep preset given to a run takes its ``run`` section, so ``hardmix train --preset
    quickstart`` trains the base run of the quickstart sweep. Validation here is pure (no
    disk, no devices): entry points check the environment once
    (:mod:`hardmix.config.environment`).
    """
    raw: dict = {}
    layers = [(read_preset(preset) if preset else None, ("space",)),
              (read_yaml_file(file) if file else None, ("space",)),
              (parse_overrides(overrides or [], cls), ())]
    for layer, replace in layers:
        if layer:
            if cls is RunConfig and preset_kind(layer) == "sweep":
                layer = layer.get("run", {}) or {}
            raw = deep_merge(raw, layer, replace=replace)
    raw.pop("kind", None)
    cfg = from_dict(cls, raw)
    validate(cfg)
    _check_set_by_hand_acts(cfg, layers[2][0])
    return cfg


def _leaves(tree: dict, columns: set[str], prefix: str = "") -> dict[str, Any]:
    """The config columns ``tree`` (a nested override mapping) sets, as dotted names; a
    mapping-valued field (``model.kwargs``) counts as one column."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if name in columns or not isinstance(value, dict):
            out[name] = value
        else:
            out.update(_leaves(value, columns, name + "."))
    return out


def _switch_points(cfg: SweepConfig) -> list[dict[str, Any]]:
    """One dict per combination of the switch values a sweep's space or arms can take (the
    only fields that decide whether another acts); ranges decide no switch."""
    import itertools

    from hardmix.config.acts import SWITCH_COLUMNS

    if cfg.arms:
        return [{k: v for k, v in arm.items() if k != "seeds"} for arm in cfg.arms]
    searched = {k: spec.values for k, spec in cfg.space.items()
                if k in SWITCH_COLUMNS and spec.values is not None}
    combos = itertools.islice(itertools.product(*searched.values()), 10_000)
    return [dict(zip(searched, values)) for values in combos]


def _check_set_by_hand_acts(cfg: Any, overrides: dict) -> None:
    """A ``--set`` run field (or an arm's field) that no run of this config reads is refused:
    :func:`hardmix.config.acts.check_given_fields_act`."""
    from hardmix.config.acts import check_given_fields_act
    from hardmix.config.rules import with_overrides
    from hardmix.config.schema import flatten

    if isinstance(cfg, RunConfig):
        row = flatten(cfg)
        check_given_fields_act(_leaves(overrides, set(row)), [row])
        return
    columns = set(flatten(cfg.run))
    points = _switch_points(cfg)
    rows = [flatten(with_overrides(cfg.run, point, rules=False)) for point in points]
    check_given_fields_act(_leaves(overrides.get("run") or {}, columns), rows, "run.")
    for i, (arm, row) in enumerate(zip(cfg.arms, rows)):
        given = {k: v for k, v in arm.items() if k != "seeds"}
        check_given_fields_act(given, [row], f"arms[{i}].")
