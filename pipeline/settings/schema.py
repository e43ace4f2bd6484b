"""Typed settings classes -> JSON Schema, filled-in defaults and a commented YAML file.

A setting is a dataclass field declared with `setting(default, help=..., <bounds>)`: its type
comes from the annotation, its bounds and allowed values from the keyword arguments (JSON Schema
keywords), its documentation from `help`. Everything else (the schema the config is validated
against, the defaults a partial config is completed with, the shipped `config.yaml`) is derived
here, so a setting is defined exactly once.
"""

from __future__ import annotations

import copy
import dataclasses
import textwrap
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

import yaml

MISSING = dataclasses.MISSING


def setting(default: Any = MISSING, *, help: str = "", **schema: Any) -> Any:
    """A settings field: its default (a mapping, list or settings object is copied per
    instance), the text that documents it, and JSON Schema keywords that bound it (minimum,
    enum, pattern, ...)."""
    metadata = {"help": help, "schema": schema}
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def to_plain(value: Any) -> Any:
    """Dataclass instances -> dicts, recursively (the shape a YAML config has)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One setting: what a dataclass field says, or an entry of a `Group`."""

    name: str
    kind: Any
    default: Any = MISSING
    help: str = ""
    schema: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Group:
    """A mapping of settings whose keys are not identifiers (stage names), or built at run time
    (one section per registered stage): the same as a settings class to everything here."""

    fields: tuple[FieldSpec, ...]
    doc: str = ""


def is_settings(kind: Any) -> bool:
    return isinstance(kind, Group) or dataclasses.is_dataclass(kind)


def fields_of(cls: Any) -> tuple[FieldSpec, ...]:
    if isinstance(cls, Group):
        return cls.fields
    hints = typing.get_type_hints(cls)
    return tuple(
        FieldSpec(
            f.name,
            hints[f.name],
            _default(f),
            f.metadata.get("help", ""),
            f.metadata.get("schema", {}),
        )
        for f in dataclasses.fields(cls)
    )


_SCALARS = {bool: "boolean", int: "integer", float: "number", str: "string"}


def type_schema(kind: Any) -> dict[str, Any]:
    """The JSON Schema of a type annotation."""
    if is_settings(kind):
        return object_schema(kind)
    origin, args = get_origin(kind), get_args(kind)
    if kind in _SCALARS:
        return {"type": _SCALARS[kind]}
    if origin is Literal:
        return {"enum": list(args)}
    if origin is list:
        return {"type": "array", "items": type_schema(args[0])}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        nullable = len(options) < len(args)
        if len(options) == 1 and options[0] in _SCALARS:
            return {"type": [_SCALARS[options[0]], "null"] if nullable else _SCALARS[options[0]]}
        if len(options) == 1 and get_origin(options[0]) is Literal:
            return {"enum": [*get_args(options[0]), *([None] if nullable else [])]}
        return {"oneOf": [type_schema(a) for a in args]}
    raise TypeError(f"no JSON Schema for settings type {kind!r}")


def _default(field: dataclasses.Field) -> Any:
    if field.default is not MISSING:
        return to_plain(field.default)
    if field.default_factory is not MISSING:
        return to_plain(field.default_factory())
    return MISSING


def object_schema(cls: Any) -> dict[str, Any]:
    """A settings class as a closed JSON Schema object: unknown keys are errors."""
    properties, required = {}, []
    for spec in fields_of(cls):
        prop: dict[str, Any] = type_schema(spec.kind)
        extra = dict(spec.schema)
        if "enum" in extra:  # a registry's names, in place of a plain `str`
            nullable = "null" in prop.get("type", ())
            prop = {"enum": [*extra.pop("enum"), *([None] if nullable else [])]}
        prop.update(extra)
        if spec.help:
            prop["description"] = spec.help
        if spec.default is MISSING:
            required.append(spec.name)
        else:
            prop["default"] = spec.default
        properties[spec.name] = prop
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }
    if required:
        schema["required"] = required
    doc = cls.doc if isinstance(cls, Group) else cls.__doc__
    if doc:
        schema["description"] = " ".join(doc.split())
    return schema


def record_type(kind: Any) -> Any:
    """The settings class of a `list[SomeSettings]` (or `list[str | SomeSettings]`), else None."""
    if get_origin(kind) is not list:
        return None
    item = get_args(kind)[0]
    options = get_args(item) if get_origin(item) in (typing.Union, types.UnionType) else (item,)
    found = [option for option in options if is_settings(option)]
    return found[0] if found else None


def defaults(cls: Any) -> dict[str, Any]:
    """Every setting of `cls` that has a default, at its default."""
    return {
        spec.name: copy.deepcopy(spec.default)
        for spec in fields_of(cls)
        if spec.default is not MISSING
    }


def _scalar(value: Any) -> str:
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10_000)
        .strip()
        .removesuffix("\n...")
        .removesuffix("...")
        .strip()
    )


def _comment_lines(text: str, indent: str, width: int = 96) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, width - len(indent) - 2)]


def render_yaml(cls: Any, values: Mapping[str, Any], indent: str = "") -> list[str]:
    """`values` as YAML lines in field order, each setting with its `help` as a comment (at
    the end of the line when it fits); a list of records is a block without comments."""
    lines: list[str] = []
    for spec in fields_of(cls):
        if spec.name not in values:
            continue
        value, kind = values[spec.name], spec.kind
        nested = is_settings(kind) and isinstance(value, Mapping)
        record = record_type(kind)
        if record and not any(isinstance(item, Mapping) for item in value):
            record = None  # plain values only: one flow-style line
        line = f"{indent}{spec.name}:"
        if (nested or record) and not indent and lines:
            lines.append("")  # a blank line before each top-level section
        if not (nested or record):
            line += f" {_scalar(value)}"
        if spec.help and not (nested or record) and len(line) + len(spec.help) + 4 <= 100:
            lines.append(f"{line}  # {spec.help}")
        else:
            lines += _comment_lines(spec.help, indent) if spec.help else []
            lines.append(line)
        if nested:
            lines += render_yaml(kind, value, indent + "  ")
        elif record:
            for item in value:
                if not isinstance(item, Mapping):
                    lines.append(f"{indent}  - {_scalar(item)}")
                    continue
                shown = {k: v for k, v in item.items() if v is not None}
                body = [f"{indent}    {k}: {_scalar(v)}" for k, v in fill_order(record, shown)]
                lines.append(f"{indent}  - {body[0].lstrip()}")
                lines += body[1:]
    return lines


def fill_order(cls: Any, values: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """`values`' items in the settings class's field order."""
    return [(f.name, values[f.name]) for f in fields_of(cls) if f.name in values]
