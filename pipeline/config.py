"""Pipeline configuration: YAML files deep-merged in order, `key.path=value` overrides, and
validation against `config.schema.json` (JSON Schema draft 2020-12).

Snakemake and every `python -m pipeline` command go through `validate`, so a wrong key or type
fails the same way everywhere, naming the key.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from pipeline.launch import launch_problems

SCHEMA_PATH = Path(__file__).with_name("config.schema.json")
DEFAULT_CONFIG = Path("config.yaml")


class ConfigError(ValueError):
    """A configuration file or value that does not match the schema."""


@cache
def _validator():
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _key(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe(error) -> str:
    where = _key(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        lines = []
        for name in unknown:
            key = f"{where}.{name}" if error.absolute_path else name
            hint = ""
            if "." in name and not error.absolute_path:
                hint = (
                    " (a dotted key at the top level: Snakemake's `--config a.b=1` does not"
                    " nest keys; put the value in a YAML file and pass `--configfile`)"
                )
            lines.append(f"{key}: unknown key{hint}; expected one of: {', '.join(allowed)}")
        return "\n".join(lines)
    return f"{where}: {error.message}"


FINE_TUNING_SECTIONS = ("finetune_classifier", "finetune_instruct", "align_dpo")


def _source_references(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, value) of every setting that names a `data.sources` entry."""
    refs = [(f"prepare.corpus.{i}", name) for i, name in enumerate(config["prepare"]["corpus"])]
    refs += [(f"{stage}.data", config[stage]["data"]) for stage in FINE_TUNING_SECTIONS]
    return refs


def validate(config: Mapping[str, Any], source: str = "config") -> None:
    """Raise ConfigError listing every key that does not match the schema."""
    errors = sorted(_validator().iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    problems = [line for e in errors for line in _describe(e).splitlines()]
    if not errors:
        names = sorted(s["name"] for s in config["data"]["sources"])
        problems += [
            f"{key}: {name!r} is not a data.sources name; expected one of: {', '.join(names)}"
            for key, name in _source_references(config)
            if name not in names
        ]
        problems += launch_problems(config)
    if problems:
        details = "\n".join("  " + line for line in problems)
        raise ConfigError(f"invalid configuration ({source}):\n{details}")


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge like Snakemake's --configfile: nested mappings merge, everything else is replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_override(config: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply `a.b.c=value` (value parsed as YAML, so 3 is an int and true a bool)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r}: expected KEY.PATH=VALUE")
    value = yaml.safe_load(raw) if raw else ""
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return deep_merge(config, nested)


def load_config(
    paths: Iterable[Path | str] = (DEFAULT_CONFIG,), overrides: Iterable[str] = ()
) -> dict[str, Any]:
    """Read, merge, override and validate; the result is the fully resolved configuration."""
    paths = [Path(p) for p in paths]
    config: dict[str, Any] = {}
    for path in paths:
        config = deep_merge(config, read_yaml(path))
    for assignment in overrides:
        config = apply_override(config, assignment)
    validate(config, source=" + ".join(str(p) for p in paths) or "config")
    return config


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}, "c": [x, y]}` -> `{"a.b": 1, "c.0": x, "c.1": y}` (MLflow params)."""
    flat: dict[str, Any] = {}
    items = config.items() if isinstance(config, Mapping) else enumerate(config)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (Mapping, list, tuple)) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def write_config(config: Mapping[str, Any], path: Path) -> None:
    """Write YAML atomically, leaving an unchanged file untouched (keeps its mtime)."""
    from pipeline.io import atomic_write_text

    text = yaml.safe_dump(dict(config), sort_keys=False)
    path = Path(path)
    if path.exists() and path.read_text() == text:
        return
    atomic_write_text(path, text)
