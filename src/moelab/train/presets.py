"""Run configs: packaged presets, YAML files and ``--set`` overrides, all validated into a :class:`RunConfig`."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..config import RunConfig, load_yaml
from ..errors import ConfigError


def available_presets() -> list[str]:
    """Packaged run presets: the YAML files under ``moelab/presets`` that are valid run configs (the directory
    also holds other tools' presets, e.g. sweeps)."""
    names = []
    for f in resources.files("moelab").joinpath("presets").iterdir():
        if f.name.endswith(".yaml"):
            try:
                RunConfig.parse(yaml.safe_load(f.read_text()) or {})
            except ConfigError:
                continue
            names.append(f.name[: -len(".yaml")])
    return sorted(names)


def load_preset(name: str) -> RunConfig:
    """A packaged preset (``src/moelab/presets/NAME.yaml``): ``smoke`` (< 1 min CPU), ``small`` (~5 min CPU)."""
    f = resources.files("moelab").joinpath("presets", f"{name}.yaml")
    if name not in available_presets():
        raise ConfigError(f"preset {name!r} does not exist (available: {', '.join(available_presets())})")
    return RunConfig.parse(yaml.safe_load(f.read_text()) or {}, where=f"preset {name}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read and validate a run YAML; ``overrides`` are ``dotted.key=value`` strings (values parsed as YAML)."""
    try:
        data = load_yaml(path)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    return RunConfig.parse(apply_overrides(data, overrides or []), where=str(path))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "model.top_k=4"]`` applied to a nested dict (a copy)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a mapping")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
    return data
