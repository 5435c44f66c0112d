"""Reading configs: YAML files, `section.field=value` overrides and type coercion into the config
dataclasses, and `build_run_config` (preset, then YAML, then overrides).

This module sits above `minimoe.config` (the dataclasses) and `minimoe.presets`; neither imports it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from minimoe.config import ModelConfig, RunConfig
from minimoe.errors import ConfigError
from minimoe.presets import get_preset, preset_train_defaults

log = logging.getLogger("minimoe.config")

# ModelConfig keys of minimoe before it took the Hugging Face names; still read (configs and run
# directories written then), with a note saying the new name.
MODEL_KEY_ALIASES = {
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "first_k_dense": "first_k_dense_replace",
    "max_seq_len": "max_position_embeddings",
    "init_std": "initializer_range",
}


def _current_key(cls: type, key: str, where: str) -> str:
    """`key`, or its current name when it is an old ModelConfig key."""
    new = MODEL_KEY_ALIASES.get(key) if cls is ModelConfig else None
    if new is None:
        return key
    log.warning(
        "%s%s is now called %s%s (the Hugging Face name); the old key still works", where, key, where, new
    )
    return new


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            pass
        try:  # 1e5: YAML 1.1 reads an exponent without a dot as text
            number = float(value)
        except ValueError:
            pass
        else:
            if number.is_integer():
                return int(number)
    raise ConfigError(f"{where} must be an integer, got {value!r}")


def _in_int64(value: int, where: str) -> int:
    """Every integer setting reaches torch or numpy as a 64-bit integer (seeds included)."""
    if not -(2**63) <= value < 2**63:
        raise ConfigError(f"{where} must fit in a signed 64-bit integer, got {value}")
    return value


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{where} must be a number, got {value!r}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the dataclass field type, or raise ConfigError naming the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(f"{where}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if type(value) is int and value in (0, 1):  # `key=1` on the command line, or 1 in YAML
            return bool(value)
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        return _in_int64(_to_int(value, where), where)
    if tp is float:
        out = _to_float(value, where)
        if not math.isfinite(out):  # nan passes every range check; inf is no setting's "off"
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        if isinstance(value, str):
            import yaml

            parsed = yaml.safe_load(value)
            if isinstance(parsed, dict):
                return parsed
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    return value


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    # an old ModelConfig name close to the key suggests its current name
    old = {a: n for a, n in MODEL_KEY_ALIASES.items() if n in valid}
    close = difflib.get_close_matches(key, valid + list(old), n=1)
    close = [old.get(c, c) for c in close]
    hint = f"; did you mean '{where}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{where}{key}'{hint}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A config dataclass's field types (resolved once per class: `typing.get_type_hints` evaluates
    every annotation string, about a millisecond, and a sweep's plan applies thousands of overrides)."""
    return typing.get_type_hints(cls)


def dataclass_from_dict(cls: type, d: dict, where: str = "") -> Any:
    """Build a dataclass from a dict, coercing types and rejecting unknown keys."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {type(d).__name__}")
    hints = _hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for k, v in d.items():
        k = _current_key(cls, k, where) if isinstance(k, str) else k
        if k not in names:
            raise _unknown_key(str(k), names, where)
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = dataclass_from_dict(tp, v or {}, f"{where}{k}.")
        else:
            kwargs[k] = _coerce(v, tp, f"{where}{k}")
    return cls(**kwargs)


def set_dotted(cfg: Any, key: str, value: Any) -> None:
    """Apply one `section.field=value` override in place."""
    parts = key.split(".")
    obj = cfg
    path = ""
    for p in parts[:-1]:
        names = [f.name for f in fields(obj)]
        if p not in names:
            raise _unknown_key(p, names, path)
        obj = getattr(obj, p)
        path += p + "."
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"config key '{path.rstrip('.')}' has no sub-keys")
    last = _current_key(type(obj), parts[-1], path)
    names = [f.name for f in fields(obj)]
    if last not in names:
        raise _unknown_key(last, names, path)
    tp = _hints(type(obj))[last]
    if dataclasses.is_dataclass(tp):  # `model=5` or `model={...}` would replace the whole section
        raise ConfigError(f"config key '{path}{last}' is a section; give {path}{last}.FIELD=value")
    if isinstance(value, str):
        import yaml

        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        # keep strings that YAML would turn into something else only if the field wants a str, or a str
        # or None (a path: YAML reads '#1.txt' as a comment, so null, and 'yes' as true); _coerce still
        # reads null and none as None there
        optional_text = str in typing.get_args(tp) and value.strip() not in ("", "~")
        value = value if tp is str or optional_text else parsed
    setattr(obj, last, _coerce(value, tp, f"{path}{last}"))


class _RepeatedKey(Exception):
    """A mapping key given twice, found while a YAML file is composed."""


def _refuse_repeated_keys(node) -> None:
    """Raise _RepeatedKey for the first scalar key that repeats in one mapping node. YAML keeps the
    last of two equal keys, so `lr` given twice would silently drop one. Merge keys (`<<: *anchor`) are
    not repeats, and a key a merge brings in may be overridden: only the node's own keys are compared."""
    import yaml

    seen = set()
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        if (key.tag, key.value) in seen:
            raise _RepeatedKey(f"'{key.value}' is given twice (line {key.start_mark.line + 1})")
        seen.add((key.tag, key.value))


def _safe_load_unique(text: str) -> Any:
    """yaml.safe_load that refuses a key given twice in one mapping (see `_refuse_repeated_keys`)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_mapping_node(self, anchor):
            node = super().compose_mapping_node(anchor)
            _refuse_repeated_keys(node)  # checked as composed, before merges are flattened into it
            return node

    loader = Loader(text)  # what yaml.load does, with a SafeLoader: plain data only
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML file's top-level mapping; each problem (missing, not UTF-8, invalid, a key given twice,
    not a mapping) is a ConfigError of one sentence naming the file as `what` ("sweep file", ...)."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {p} does not exist")
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a directory, not a YAML file")
    try:
        data = _safe_load_unique(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {p} is not UTF-8 text") from None
    except _RepeatedKey as e:
        raise ConfigError(f"{what} {p}: {e}; each key must be unique") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what} {p} is not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p} must hold a mapping at the top level")
    return data


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for it in items:
        if "=" not in it:
            raise ConfigError(f"override '{it}' is not of the form key=value")
        k, v = it.split("=", 1)
        out.append((k.strip(), v))
    return out


def build_run_config(
    preset: str | None = None, config_path: str | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """Preset (its model and training recipe), then YAML file (whose `preset:` key wins over
    `preset`), then dotted overrides; validated."""
    cfg = RunConfig()

    def use_preset(name: str) -> None:  # the whole recipe: a second preset leaves nothing of the first
        fresh = RunConfig()
        cfg.train, cfg.data, cfg.dist = fresh.train, fresh.data, fresh.dist
        cfg.model = get_preset(name)
        for k, v in preset_train_defaults(name).items():
            set_dotted(cfg, k, v)

    if preset is not None:
        use_preset(preset)
    if config_path is not None:
        d = load_yaml(config_path)
        if "preset" in d:
            use_preset(str(d.pop("preset")))
        for section in ("model", "train", "data", "dist"):
            sub = d.pop(section, None) or {}
            if not isinstance(sub, dict):
                raise ConfigError(f"config section '{section}' must be a mapping")
            for k, v in sub.items():
                set_dotted(cfg, f"{section}.{k}", v)
        if d:
            raise _unknown_key(next(iter(d)), ["model", "train", "data", "dist", "preset"], "")
    for k, v in parse_overrides(overrides or []):
        set_dotted(cfg, k, v)
    return cfg.validate()
