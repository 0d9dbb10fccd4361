"""YAML configs merged over packaged defaults, with unknown keys refused."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from leukolab.errors import LeukolabError


def load_defaults(name: str) -> dict[str, Any]:
    """The packaged default config ``leukolab/configs/<name>.yaml``."""
    text = resources.files("leukolab.configs").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def read_yaml(path: Path | str) -> dict[str, Any]:
    """A YAML mapping from ``path``, or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise LeukolabError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise LeukolabError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LeukolabError(f"{path}: expected a YAML mapping at the top level")
    return data


def merge(base: dict[str, Any], override: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``; keys absent from ``base`` are refused.

    Mappings listed as free-form in ``base`` (an empty ``{}``, e.g. ``backbone_kwargs``)
    accept any keys.
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in out:
            choices = ", ".join(sorted(out))
            raise LeukolabError(f"unknown {where} key {key!r}; expected one of: {choices}")
        if isinstance(out[key], dict) and out[key] and isinstance(value, dict):
            out[key] = merge(out[key], value, f"{where} key {key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``cfg["a"]["b"] = value`` for ``dotted == "a.b"`` (keys must exist)."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    if leaf not in node:
        raise LeukolabError(f"unknown config key {dotted!r}")
    node[leaf] = value


def get_dotted(cfg: dict[str, Any], dotted: str) -> Any:
    """``cfg["a"]["b"]`` for ``dotted == "a.b"``."""
    node: Any = cfg
    for p in dotted.split("."):
        node = node[p]
    return node


def resolve(name: str, config_file: Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Defaults <- ``config_file`` <- ``overrides`` (dotted keys; ``None`` values ignored)."""
    cfg = load_defaults(name)
    if config_file is not None:
        cfg = merge(cfg, read_yaml(config_file))
    for dotted, value in overrides.items():
        if value is not None:
            set_dotted(cfg, dotted, value)
    return cfg


def diff_overrides(saved: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
    """Descriptions of overrides that disagree with ``saved`` (for ``--resume``)."""
    out = []
    for dotted, value in overrides.items():
        if value is None:
            continue
        old = get_dotted(saved, dotted)
        if old != value:
            out.append(f"{dotted}={value!r} (the run has {old!r})")
    return out
