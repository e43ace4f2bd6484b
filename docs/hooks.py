"""MkDocs hook: the reference pages are rendered from the code at every build, never copied.

A page holds a marker, `<!-- reference: settings -->` (every setting, from the same JSON Schema
that validates a config and renders config.yaml), `<!-- reference: cli -->` (the argparse
parser of `python -m pipeline`) or `<!-- reference: stages -->` (the stage registry); the hook
puts the generated tables in its place. An unknown marker fails the build, so a renamed one
cannot leave a page silently empty.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from mkdocs.exceptions import PluginError

from pipeline.cli import build_parser
from pipeline.settings.load import defaults, json_schema, resolve, typed_config
from pipeline.stages.registry import STAGES, Stage

MARKER = re.compile(r"<!-- reference: ([a-z-]+) -->")
GENERATED_DOC = re.compile(r"^\w+\(.*\)$")
"""The docstring dataclasses give a class without one (`PathSettings(data: 'str' = ...)`)."""
LONG_DEFAULT = 60
"""Characters above which a default is summarised (the source list's seven entries)."""


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replaces each marker with its generated reference."""
    return MARKER.sub(lambda match: _render(match.group(1)), markdown)


def _render(name: str) -> str:
    renderers: dict[str, Callable[[], str]] = {
        "settings": settings_reference,
        "cli": cli_reference,
        "stages": stages_reference,
    }
    if name not in renderers:
        raise PluginError(f"docs: unknown reference marker {name!r}; known: {sorted(renderers)}")
    return renderers[name]()


def _code(text: str) -> str:
    return f"<code>{html.escape(text)}</code>"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """An HTML table (cells already escaped): no Markdown pipe escaping to get wrong."""
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    thead = f"<thead><tr>{head}</tr></thead>\n" if any(header) else ""
    return f"<table>\n{thead}<tbody>{body}</tbody>\n</table>\n"


# --- settings -------------------------------------------------------------------------------


def _type(prop: Mapping[str, Any]) -> str:
    if "enum" in prop:
        return " | ".join(json.dumps(value) for value in prop["enum"])
    if "oneOf" in prop:
        return " | ".join(_type(option) for option in prop["oneOf"])
    kind = prop.get("type", "object")
    kinds = kind if isinstance(kind, list) else [kind]
    if "array" in kinds:
        return f"list[{_type(prop.get('items', {}))}]"
    return " | ".join(kinds)


BOUNDS = {
    "minimum": "≥ {}",
    "maximum": "≤ {}",
    "exclusiveMinimum": "> {}",
    "exclusiveMaximum": "< {}",
    "minLength": "length ≥ {}",
    "minItems": "items ≥ {}",
    "maxItems": "items ≤ {}",
    "pattern": "matches {}",
}


def _bounds(prop: Mapping[str, Any]) -> str:
    return ", ".join(_code(BOUNDS[key].format(prop[key])) for key in BOUNDS if key in prop)


def _default(prop: Mapping[str, Any]) -> str:
    if "default" not in prop:
        return "required"
    text = json.dumps(prop["default"], ensure_ascii=False)
    if len(text) > LONG_DEFAULT and isinstance(prop["default"], list):
        return f"{len(prop['default'])} entries (see <code>config.yaml</code>)"
    return _code(text)


def _record(prop: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The object schema of a list's entries (data.sources, prepare.corpus), if any."""
    items = prop.get("items", {})
    options = items.get("oneOf", [items])
    return next((option for option in options if "properties" in option), None)


def _leaves(prefix: str, schema: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(dotted key, schema) of every setting below `schema`, nested sections flattened."""
    for name, prop in schema.get("properties", {}).items():
        key = f"{prefix}{name}"
        if "properties" in prop:
            yield from _leaves(f"{key}.", prop)
            continue
        yield key, prop
        record = _record(prop)
        if record is not None:
            yield from _leaves(f"{key}[].", record)


def _settings_row(key: str, prop: Mapping[str, Any]) -> tuple[str, ...]:
    help_text = html.escape(prop.get("description", ""))
    return (_code(key), _code(_type(prop)), _default(prop), _bounds(prop), help_text)


def settings_reference() -> str:
    """One table per top-level section; a section's own description above it."""
    root = json_schema()
    top = {n: p for n, p in root["properties"].items() if "properties" not in p}
    sections = {n: p for n, p in root["properties"].items() if "properties" in p}
    header = ("key", "type", "default", "bounds", "meaning")
    parts = ["## Top level\n", _table(header, [_settings_row(k, p) for k, p in top.items()])]
    for name, section in sections.items():
        parts.append(f"## `{name}`\n")
        if section.get("description") and not GENERATED_DOC.match(section["description"]):
            parts.append(html.escape(section["description"]) + "\n")
        parts.append(_table(header, [_settings_row(k, p) for k, p in _leaves(f"{name}.", section)]))
    return "\n".join(parts)


# --- CLI ------------------------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, Any]]:
    """(name, help, subparser) of each `python -m pipeline` command."""
    for action in parser._actions:  # argparse keeps its sub-commands only here
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def _argument_row(action: argparse.Action) -> tuple[str, ...]:
    metavar = action.metavar or (action.dest.upper() if action.nargs != 0 else "")
    names = ", ".join(f"{o} {metavar}".strip() for o in action.option_strings) or metavar
    shown = action.default not in (None, False, argparse.SUPPRESS, "")
    default = _code(str(action.default)) if shown else ""
    required = "yes" if action.required or not action.option_strings else ""
    return (_code(str(names)), required, default, html.escape(action.help or ""))


def cli_reference() -> str:
    """Per command: its help, its usage as argparse prints it, and a table of its arguments."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"  # argparse wraps usage at the terminal's width
    try:
        parser = build_parser()
        parts = [f"```text\n{parser.format_usage()}```\n"]
        for name, help_text, sub in _commands(parser):
            rows = [_argument_row(a) for a in sub._actions if a.dest != "help"]
            parts += [f"## `{name}`\n", f"{html.escape(help_text)}\n"]
            parts.append(f"```text\n{sub.format_usage()}```\n")
            if rows:
                parts.append(_table(("argument", "required", "default", "meaning"), rows))
        return "\n".join(parts)
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous


# --- stages ---------------------------------------------------------------------------------


def _runs_as(stage: Stage) -> str:
    if stage.trains:
        return "one training job (torchrun when <code>train.nproc_per_node</code> &gt; 1)"
    if stage.parts:
        return "<code>--part i-of-n</code> jobs, then <code>--gather</code>"
    return "one job"


def _writes(stage: Stage) -> str:
    if not stage.trains:
        return ""
    files = ("model/", "metrics.json", *stage.outputs)
    return ", ".join(_code(name) for name in files) + f" in {_code(f'results/{stage.name}/')}"


def _reads(stage: Stage, config: Any) -> str:
    if stage.inputs is None:
        return ""
    inputs = stage.inputs(config)
    return "<br>".join(f"{html.escape(k)}: {_code(str(v))}" for k, v in inputs.items() if v)


def _headline(stage: Stage) -> str:
    if not stage.trains:
        return ""
    better = "higher" if stage.headline.higher_is_better else "lower"
    return f"{_code(stage.headline.metric)} ({better} is better)"


def _resources(stage: Stage) -> str:
    if stage.resources is None:
        return ""
    values = vars(stage.resources)
    return ", ".join(_code(f"{k}: {json.dumps(v)}") for k, v in values.items())


def stages_reference() -> str:
    """Per stage, a two-column table: what it is called, reads, writes and asks for."""
    config = typed_config(resolve(defaults()))
    parts = []
    for stage in STAGES.values():
        rows = [
            ("command", _code(f"python -m pipeline {stage.name}")),
            ("Snakemake rule", _code(stage.rule)),
            ("report rule", _code(f"{stage.rule}_report") + f": {html.escape(stage.report)}"),
            ("runs as", _runs_as(stage)),
            ("reads (default config)", _reads(stage, config)),
            ("writes", _writes(stage)),
            ("@champion follows", _headline(stage)),
            ("default resources", _resources(stage)),
        ]
        parts += [f"## `{stage.name}`\n", _table(("", ""), [r for r in rows if _shown(r, stage)])]
    return "\n".join(parts)


def _shown(row: tuple[str, str], stage: Stage) -> bool:
    return bool(row[1]) and (row[0] != "report rule" or bool(stage.report))
