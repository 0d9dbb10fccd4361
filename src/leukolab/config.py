"""YAML configs merged over packaged defaults (and a named preset), with unknown keys refused."""

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


def preset_names() -> list[str]:
    """The packaged presets (``leukolab/configs/presets/<name>.yaml``), by name."""
    folder = resources.files("leukolab.configs").joinpath("presets")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _is_preset_file(preset: str) -> bool:
    return preset.endswith((".yaml", ".yml")) or "/" in preset or "\\" in preset


def preset_label(preset: str | Path) -> str:
    """How a run records ``preset``: a packaged name as is, a user YAML file as its absolute path.

    A value ending in ``.yaml``/``.yml`` or holding a path separator is a file; anything else a packaged name.
    """
    preset = str(preset)
    return str(Path(preset).resolve()) if _is_preset_file(preset) else preset


def load_preset(preset: str | Path) -> dict[str, Any]:
    """The mapping of a packaged preset name or a user YAML file (see :func:`preset_label`)."""
    preset = str(preset)
    if _is_preset_file(preset):
        if not Path(preset).is_file():
            raise LeukolabError(f"preset file {preset} does not exist; expected a YAML file or one of: "
                                f"{', '.join(preset_names())}")
        data = read_yaml(preset)
    else:
        names = preset_names()
        if preset not in names:
            raise LeukolabError(f"unknown preset {preset!r}; expected a YAML file or one of: {', '.join(names)}")
        text = resources.files("leukolab.configs").joinpath("presets", f"{preset}.yaml").read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
    if "preset" in data:
        raise LeukolabError(f"preset {preset} names another preset ({data['preset']!r}); presets do not nest")
    return data


#: what an ensemble preset's ``ensemble:`` section may say about the weights of its members
ENSEMBLE_WEIGHTS = ("equal", "log_loss", "balanced_accuracy")


def ensemble_preset(preset: str | Path) -> dict[str, Any] | None:
    """The checked ``ensemble:`` section of a preset (``None`` for a single-model preset).

    An ensemble preset trains one run per entry of ``ensemble.members`` -- each a mapping merged over the
    rest of the preset (``{}``: the preset as it is) -- and writes an ensemble folder over them with
    ``ensemble.weights`` (``equal``, or fitted on the members' validation split: ``log_loss`` /
    ``balanced_accuracy``) and ``ensemble.tta`` (the ensemble's own TTA setting).
    """
    return check_ensemble(load_preset(preset).get("ensemble"), preset)


def check_ensemble(section: Any, preset: str | Path) -> dict[str, Any] | None:
    """``section`` (a preset's ``ensemble:`` value, ``None`` if absent) checked and completed with its defaults."""
    if section is None:
        return None
    where = f"preset {preset}: ensemble"
    if not isinstance(section, dict):
        raise LeukolabError(f"{where}: expected a mapping with members, weights and tta")
    unknown = sorted(set(section) - {"members", "weights", "tta"})
    if unknown:
        raise LeukolabError(f"{where}: unknown key {unknown[0]!r}; expected members, weights, tta")
    members = section.get("members")
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, dict) for m in members):
        raise LeukolabError(f"{where}.members: expected a list of at least 2 mappings (config overrides; {{}} for "
                            "the preset as it is)")
    weights = section.get("weights", "equal")
    if weights not in ENSEMBLE_WEIGHTS:
        raise LeukolabError(f"{where}.weights {weights!r}; expected one of: {', '.join(ENSEMBLE_WEIGHTS)}")
    tta = section.get("tta", False)
    if not isinstance(tta, bool):
        raise LeukolabError(f"{where}.tta {tta!r}; expected true or false")
    return {"members": members, "weights": weights, "tta": tta}


def resolve(name: str, config_file: Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Defaults <- preset <- ``config_file`` <- ``overrides`` (dotted keys; ``None`` values ignored).

    When the defaults have a top-level ``preset`` key (``train``), the preset named by
    ``overrides["preset"]`` or else by the config file's ``preset:`` is merged over the defaults
    first (:func:`load_preset`), and ``preset`` records it (:func:`preset_label`). Of an ensemble preset
    (:func:`ensemble_preset`), member ``preset_member`` (default 0) is merged over the rest of the preset.
    """
    cfg = load_defaults(name)
    user = read_yaml(config_file) if config_file is not None else {}
    preset = overrides.get("preset") or user.get("preset")
    if "preset" in cfg and preset:
        content = load_preset(preset)
        section = check_ensemble(content.pop("ensemble", None), preset)
        try:
            cfg = merge(cfg, content)
            if section is not None:
                index = overrides.get("preset_member")
                index = user.get("preset_member", 0) if index is None else index
                index = 0 if index is None else int(index)
                last = len(section["members"]) - 1
                if not 0 <= index <= last:
                    raise LeukolabError(f"preset_member {index}: the preset has members 0-{last}")
                cfg = merge(cfg, section["members"][index])
                cfg["preset_member"] = index
        except LeukolabError as exc:
            raise LeukolabError(f"preset {preset}: {exc}") from None
        user = {**user, "preset": preset_label(preset)}
    cfg = merge(cfg, user)
    for dotted, value in overrides.items():
        if value is not None and not (dotted == "preset" and "preset" in cfg):  # the preset: recorded above
            set_dotted(cfg, dotted, value)
    return cfg


def fill_missing(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with the keys it lacks taken from ``defaults`` (recursively; its own values kept).

    For a run written before a key existed: new keys default to the behaviour before them.
    """
    out = copy.deepcopy(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and value and isinstance(out[key], dict):
            out[key] = fill_missing(out[key], value)
    return out


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
