"""The project's one configuration mechanism: typed dataclasses filled from YAML and dotted overrides.

Every command builds its config the same way (lowest priority first):
    dataclass defaults  <  --config FILE.yaml  <  command-line flags  <  dotted overrides (`resize.image_size=384`)

OmegaConf structured configs do the merging and type checking; unknown keys and values of the wrong type are
errors that name the key and where it came from. The typed dataclass is then instantiated, so each dataclass's
`__post_init__` validates values (ranges, choices) in one place.

Every package's typed dataclasses (the sharder's, the recipes', ...) are filled through this one function.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mpm.core.errors import ConfigError
from mpm.core.files import atomic_write_bytes

T = TypeVar("T")


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]


def _full_key(exc: OmegaConfBaseException) -> str | None:
    return getattr(exc, "full_key", None) or None


def _merge(base, layer, source: str):
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as exc:
        key = _full_key(exc)
        where = f"key '{key}'" if key else "a key"
        hint = " (this key takes a list: write [a, b], or [a] for one item)" if "ListConfig" in str(exc) else ""
        raise ConfigError(f"{source}: {where} is invalid: {_first_line(exc)}{hint}") from None
    except TypeError:  # OmegaConf: a list where a section is, or the reverse (`key.0=x` on a list, ...)
        key, wanted = _container_mismatch(OmegaConf.to_container(base), OmegaConf.to_container(layer))
        if wanted == "list":
            what = "a list: give the whole list, e.g. key=[a,b] (one item of it cannot be set alone)"
        else:
            what = "a section of key: value pairs"
        raise ConfigError(f"{source}: key '{key}' takes {what}") from None


def _container_mismatch(base, layer, prefix: str = "") -> tuple[str, str]:
    """(dotted key, "list" or "section") of the first place where `layer` puts a list where `base` has a section,
    or the reverse."""
    if isinstance(base, dict) and isinstance(layer, dict):
        for key, value in layer.items():
            if key in base:
                found = _container_mismatch(base[key], value, f"{prefix}{key}.")
                if found[0]:
                    return found
        return "", ""
    if isinstance(base, list) and not isinstance(layer, list):
        return prefix[:-1], "list"
    if isinstance(base, dict) and not isinstance(layer, dict):
        return prefix[:-1], "section"
    return "", ""


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true / false. YAML 1.1 also reads no, yes, on and off as booleans, which
    turns `train.mixed_precision: no` into False; a key typed bool still accepts them (OmegaConf converts)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# Floats as OmegaConf reads them (YAML 1.1 wants a dot: `1e-3` would stay a string), from omegaconf/_utils.py.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def nest_flat(flat: Mapping[str, Any]) -> dict:
    """{"resize.image_size": 256} -> {"resize": {"image_size": 256}}."""
    nested: dict = {}
    for dotted, value in flat.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def load_config(
    schema: type[T],
    path: str | os.PathLike | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Build a typed config.

    Args:
        schema: the config dataclass (e.g. `dataproc.sharder.ShardConfig`).
        path: optional YAML file; its keys must exist in `schema`.
        flags: already-parsed command-line flags as dotted keys (`{"resize.image_size": 256}`).
        overrides: `key.sub=value` strings; values are parsed as YAML (`filters.languages=[en,zh]`).
    Returns:
        an instance of `schema`, validated by its `__post_init__`.
    """
    merged = OmegaConf.structured(schema)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            content = parse_yaml(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(content, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(content).__name__}")
        merged = _merge(merged, OmegaConf.create(content), str(path))
    if flags:
        merged = _merge(merged, OmegaConf.create(nest_flat(flags)), "command-line flag")
    for item in overrides:
        key, equals, text = item.partition("=")
        if not equals or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        try:  # the value is YAML (`[en, zh]`, `null`, `1e-4`), with YAML 1.2's booleans: `no` stays a string
            layer = OmegaConf.create(nest_flat({key.strip(): parse_yaml(text) if text.strip() else None}))
        except (yaml.YAMLError, OmegaConfBaseException) as exc:
            raise ConfigError(f"override {item!r}: {_first_line(exc)}") from None
        merged = _merge(merged, layer, f"override {item!r}")
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config: {_first_line(exc)}") from None


def config_to_dict(config: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def config_to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config beside an output, atomically."""
    atomic_write_bytes(Path(path), config_to_yaml(config).encode("utf-8"))


def diff_configs(old: Any, new: Any, ignore: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two configs of the same schema: [(key, old, new)].

    `ignore` holds dotted keys or section names ("fetch") whose differences do not count.
    """
    out: list[tuple[str, Any, Any]] = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{prefix}{k}.")
        elif a != b and not any(prefix[:-1] == p or prefix.startswith(p + ".") for p in ignore):
            out.append((prefix[:-1], a, b))

    walk(config_to_dict(old), config_to_dict(new), "")
    return out


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"`{name}` must be one of {list(choices)}, got {value!r}")


def check_range(name: str, value: float | None, low: float | None = None, high: float | None = None) -> None:
    if value is None:
        return
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ConfigError(f"`{name}` must be in {bounds}, got {value!r}")
