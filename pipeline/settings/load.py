"""A config's values, from YAML files to the typed `Config`: files deep-merged in order,
`key.path=value` overrides, checked against the JSON Schema (draft 2020-12) derived from the
settings classes, completed with the defaults (so the resolved config holds every effective
value), then built as those classes (`typed_config`).

Snakemake and every `python -m pipeline` command go through `resolve`, so a wrong key or type
fails the same way everywhere, naming the key. `schema.py` derives, from the classes, what this
module checks values against.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import typing
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, get_args

import yaml

from pipeline import settings
from pipeline.errors import InputError
from pipeline.io import atomic_write_text
from pipeline.model.architecture import PRESETS
from pipeline.model.weights import PRESET_FOR_WEIGHTS_NAME, SCRATCH
from pipeline.paths import Paths
from pipeline.settings import END_OF_TEXT, Config, Split, StageConfig, schema
from pipeline.settings.schema import MISSING, FieldSpec, Group, fields_of, is_settings, record_type
from pipeline.stages.registry import (
    STAGES,
    FineTuningSection,
    fine_tuning_stages,
    scheduled_stages,
    training_stages,
)

DEFAULT_CONFIG = Path("config.yaml")
SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"


class ConfigError(InputError):
    """A configuration file or value that does not match the schema."""


class ConfigLoader(yaml.SafeLoader):
    """YAML as config files are written: `1e-3` and `5E-4` are floats, not the strings YAML 1.1
    (PyYAML) makes of an exponent without a dot or without a sign."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """`text` read with ConfigLoader: every config file and `--set` value goes through here."""
    return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader: no objects built


def root_settings() -> Group:
    """The whole config: the fixed sections, then one section per registered stage that has
    settings, then each training stage's resources."""
    resources = Group(
        tuple(
            FieldSpec(name, settings.StageResources, schema.to_plain(stage.resources))
            for name, stage in scheduled_stages().items()
        ),
        doc=settings.StageResources.__doc__ or "",
    )
    fields = (
        FieldSpec("seed", int, 1234, schema={"minimum": 0}),
        FieldSpec(
            "device", settings.Device, "auto", help="auto (cuda > mps > cpu) | cpu | cuda | mps"
        ),
        FieldSpec("paths", settings.PathSettings, schema.defaults(settings.PathSettings)),
        FieldSpec("data", settings.DataSettings, schema.defaults(settings.DataSettings)),
        FieldSpec("model", settings.ModelSettings, schema.defaults(settings.ModelSettings)),
        *(
            FieldSpec(name, stage.settings, schema.defaults(stage.settings))
            for name, stage in STAGES.items()
            if stage.settings is not None
        ),
        FieldSpec("resources", resources, schema.defaults(resources)),
        FieldSpec(
            "tracking", settings.TrackingSettings, schema.defaults(settings.TrackingSettings)
        ),
    )
    return Group(fields, doc="gpt-pipeline configuration")


def json_schema() -> dict[str, Any]:
    """The config's JSON Schema, with every setting's type, bounds, default and description."""
    return {
        "$schema": SCHEMA_URI,
        "title": "gpt-pipeline configuration",
        **schema.object_schema(root_settings()),
    }


@cache
def _validator():
    import jsonschema  # deferred: jsonschema takes ~0.13 s; the Snakefile imports this module

    found = json_schema()
    jsonschema.Draft202012Validator.check_schema(found)
    return jsonschema.Draft202012Validator(found)


def defaults() -> dict[str, Any]:
    """Every setting at its default: what `config.yaml` holds."""
    return schema.defaults(root_settings())


def render_defaults() -> str:
    """`config.yaml`: every default, each with its meaning."""
    header = [
        "# The pipeline's defaults, sized so the whole DAG runs on 2 CPU cores. Generated from",
        "# pipeline/settings by `python -m pipeline config --defaults > config.yaml`:",
        "# change a default there. Put your own values in a file of yours and pass it with",
        "# `snakemake --configfile my.yaml` or `python -m pipeline <stage> --config my.yaml`",
        "# (deep-merged over these; lists replace). Relative paths are relative to the directory",
        "# the pipeline runs in.",
        "",
    ]
    return "\n".join(header + schema.render_yaml(root_settings(), defaults())) + "\n"


def render_resolved(config: Mapping[str, Any]) -> str:
    """The resolved config as YAML, each model size left null annotated with the preset's value
    (what the run builds), so `python -m pipeline config` shows the model's real shape."""
    sizes, preset = preset_sizes(config["model"]), config["model"]["preset"]
    lines, in_model = [], False
    for line in yaml.safe_dump(dict(config), sort_keys=False).splitlines():
        if not line.startswith(" "):
            in_model = line == "model:"
        key, _, value = line.strip().partition(": ")
        if in_model and key in PRESET_KEYS and value == "null":
            line += f"  # preset {preset}: {yaml.safe_dump(sizes[key]).split()[0]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


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
            if name.replace("_", "-") in allowed and name.replace("_", "-") != name:
                hint = f" (stage sections are spelt like the stage: {name.replace('_', '-')})"
            if "." in name and not error.absolute_path:
                hint = (
                    " (a dotted key at the top level: Snakemake's `--config a.b=1` does not"
                    " nest keys; put the value in a YAML file and pass `--configfile`)"
                )
            lines.append(f"{key}: unknown key{hint}; expected one of: {', '.join(allowed)}")
        return "\n".join(lines)
    return f"{where}: {error.message}"


PRESET_KEYS = ("context_length", "n_layer", "n_head", "n_embd", "qkv_bias")
"""The model settings whose null means "the preset's"."""


def preset_sizes(model: Mapping[str, Any]) -> dict[str, Any]:
    """The model section's architecture: its preset's values where the section says null."""
    preset = PRESETS[model["preset"]]
    return {k: preset[k] if model.get(k) is None else model[k] for k in PRESET_KEYS}


METRIC_KEYS = ("steps", "train_loss", "val_loss", "tokens_per_second")
"""Keys every training stage's metrics.json has: `not_a_config_file` says such a file is one."""


def not_a_config_file(path: Path | str, values: Mapping[str, Any]) -> str | None:
    """`<path>: not a config file (why)` for a file given as a config file (read as `values`)
    whose top-level keys are mostly no settings, else None. Mostly: at least two keys, and more
    than half of them neither a setting nor a near miss of one (a typo stays an unknown key,
    with its hint). Each file is checked on its own before the files are merged: merged with a
    real config, such a file (a Snakemake target read as a config file, a profile's settings)
    gives one unknown-key line per key and names no file."""
    names = [spec.name for spec in root_settings().fields]
    keys = [str(key) for key in values]
    foreign = [k for k in keys if not difflib.get_close_matches(k, names, n=1, cutoff=0.8)]
    if len(foreign) < 2 or 2 * len(foreign) <= len(keys):
        return None
    shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
    if any(key in METRIC_KEYS for key in foreign):
        why = f"it holds metrics ({shown}), as a stage's metrics.json does"
    else:
        why = f"{len(foreign)} of its {len(keys)} top-level keys are no settings: {shown}"
    return f"{path}: not a config file ({why}); a config file's top-level keys are settings: " + (
        ", ".join(names)
    )


def fill_defaults(cls: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with every missing setting set to its default, nested classes included."""
    filled = dict(values)
    for spec in fields_of(cls):
        if spec.name not in filled:
            if spec.default is not MISSING:
                filled[spec.name] = copy.deepcopy(spec.default)
            continue
        kind, value = spec.kind, filled[spec.name]
        if is_settings(kind) and isinstance(value, Mapping):
            filled[spec.name] = fill_defaults(kind, value)
        elif record_type(kind) is not None and isinstance(value, list):
            item = record_type(kind)
            filled[spec.name] = [
                fill_defaults(item, v) if isinstance(v, Mapping) else v for v in value
            ]
    return filled


_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def _number_type(kind: Any) -> type | None:
    """int or float for a setting of that type (or that type or None), else None."""
    options = [a for a in get_args(kind) if a is not type(None)] if get_args(kind) else [kind]
    return options[0] if len(options) == 1 and options[0] in (int, float) else None


def _coerce(kind: type, value: Any) -> Any:
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def coerce_numbers(cls: Any, values: Any) -> Any:
    """`values` with a plain numeric literal given as a string (`"1e-3"`, which YAML 1.1 loaders
    such as Snakemake's make of `1e-3`) made a number where the setting is one, and a whole
    float (`1e3`) made an int where the setting is an int. Anything else is left to validation."""
    if not isinstance(values, Mapping):
        return values
    coerced = dict(values)
    for spec in fields_of(cls):
        if spec.name not in coerced:
            continue
        kind, value = spec.kind, coerced[spec.name]
        if is_settings(kind):
            coerced[spec.name] = coerce_numbers(kind, value)
        elif (number := _number_type(kind)) is not None:
            coerced[spec.name] = _coerce(number, value)
        elif (record := record_type(kind)) is not None and isinstance(value, list):
            coerced[spec.name] = [coerce_numbers(record, v) for v in value]
    return coerced


def from_plain(kind: Any, value: Any) -> Any:
    """A checked, complete value as the settings type `kind` says: a mapping becomes its
    settings class (recursively, lists of records too); anything else is already its type."""
    if isinstance(kind, type) and dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
        hints = typing.get_type_hints(kind)
        fields = dataclasses.fields(kind)
        return kind(**{f.name: from_plain(hints[f.name], value[f.name]) for f in fields})
    item = record_type(kind)
    if item is not None and isinstance(value, list):
        return [from_plain(item, v) if isinstance(v, Mapping) else v for v in value]
    return value


def _paths(paths: settings.PathSettings) -> Paths:
    return Paths(Path(paths.data), Path(paths.results), Path(paths.resume), Path(paths.weights))


def typed_config(resolved: Mapping[str, Any]) -> Config:
    """The resolved config (`resolve`'s) as the settings classes: what the runner hands a stage."""
    return Config(
        seed=resolved["seed"],
        device=resolved["device"],
        paths=_paths(from_plain(settings.PathSettings, resolved["paths"])),
        data=from_plain(settings.DataSettings, resolved["data"]),
        model=from_plain(settings.ModelSettings, resolved["model"]),
        sections={
            name: from_plain(stage.settings, resolved[name])
            for name, stage in STAGES.items()
            if stage.settings is not None
        },
        resources={
            name: from_plain(settings.StageResources, values)
            for name, values in resolved["resources"].items()
        },
        tracking=from_plain(settings.TrackingSettings, resolved["tracking"]),
        resolved=resolved,
    )


def stage_config(resolved: Mapping[str, Any], stage: str) -> StageConfig[Any]:
    """What the runner hands the stage `stage`: the resolved config, typed, with its section."""
    return typed_config(resolved).for_stage(stage, STAGES[stage].settings or type(None))


def _source_problems(config: Config) -> list[str]:
    """Settings that name a `data.sources` entry it does not have: the corpus's names and the
    `data` of every stage section that has one."""
    names = sorted(source.name for source in config.data.sources)
    corpus = config.section_of("prepare", settings.PrepareSettings).corpus
    refs = [(f"prepare.corpus.{i}", item) for i, item in enumerate(corpus) if isinstance(item, str)]
    refs += [
        (f"{name}.data", section.data)
        for name, section in config.sections.items()
        if isinstance(getattr(section, "data", None), str)
    ]
    return [
        f"{key}: {name!r} is not a data.sources name; expected one of: {', '.join(names)}"
        for key, name in refs
        if name not in names
    ]


def _tokenizer_problems(config: Config) -> list[str]:
    """A trained tokenizer against its special tokens, the stages it names, and the stages
    that start from GPT-2's weights (which come with GPT-2's tokenizer)."""
    section = config.section_of("tokenizer", settings.TokenizerSettings)
    problems = []
    if section.special_tokens[0] != END_OF_TEXT:
        problems.append(
            f"tokenizer.special_tokens: the first must be {END_OF_TEXT} (document separator, "
            f"eos and padding), not {section.special_tokens[0]!r}"
        )
    fine_tuning = fine_tuning_stages()
    problems += [
        f"tokenizer.fine_tuning: {name!r} is not a fine-tuning stage; expected one of: "
        f"{', '.join(fine_tuning)}"
        for name in section.fine_tuning
        if name not in fine_tuning
    ]
    if section.kind != "trained":
        return problems
    least = 256 + len(section.special_tokens)  # rustbpe panics below 256 ranks
    if section.vocab_size < least:
        problems.append(
            f"tokenizer.vocab_size: {section.vocab_size} leaves no room for the 256 byte tokens "
            f"and {len(section.special_tokens)} special tokens; expected at least {least}"
        )
    for name, stage_section in config.sections.items():
        init_from = getattr(stage_section, "init_from", None)
        if init_from in PRESET_FOR_WEIGHTS_NAME:
            problems.append(
                f"{name}.init_from: {init_from!r} is GPT-2's weights, which come with GPT-2's "
                "tokenizer, but tokenizer.kind is trained: set tokenizer.kind: gpt2, or start "
                "from scratch or from a stage trained with this tokenizer"
            )
    return problems


def _training_problems(config: Config) -> list[str]:
    """A training section's settings that contradict each other or its resources."""
    problems = []
    for name in training_stages():
        train: settings.TrainSettings = config.sections[name].train
        if train.min_lr > train.lr:
            problems.append(f"{name}.train: min_lr ({train.min_lr}) must be ≤ lr ({train.lr})")
        if train.max_steps is not None and train.warmup_steps >= train.max_steps:
            problems.append(
                f"{name}.train: warmup_steps ({train.warmup_steps}) must be < max_steps "
                f"({train.max_steps})"
            )
        problems += _launch_problems(name, train, config.resources[name])
    return problems


def _launch_problems(
    name: str, train: settings.TrainSettings, resources: settings.StageResources
) -> list[str]:
    """How a training stage is launched, against its batch and its resources."""
    problems = []
    size, nproc = train.world_size, train.nproc_per_node
    if train.batch_size % size:
        problems.append(
            f"{name}.train.batch_size: {train.batch_size} is not divisible by the world size "
            f"{size} (nproc_per_node {nproc} x nnodes {train.nnodes}); it is the global batch, "
            "split evenly among the processes"
        )
    if resources.gpu and resources.gpu != nproc:
        problems.append(
            f"resources.{name}.gpu: {resources.gpu} GPUs per node but {name}.train."
            f"nproc_per_node is {nproc}; each process drives one GPU, so make them equal"
        )
    if resources.threads is not None and resources.threads < nproc:
        problems.append(
            f"resources.{name}.threads: {resources.threads} is fewer than {name}.train."
            f"nproc_per_node ({nproc}); each process needs at least one CPU"
        )
    return problems


def _section_problems(name: str, section: object) -> list[str]:
    """A stage section's split fractions and labels that contradict each other."""
    problems = []
    split = getattr(section, "split", None)
    if isinstance(split, Split) and split.train + split.val >= 1:
        problems.append(
            f"{name}.split: train ({split.train}) + val ({split.val}) must be < 1 "
            "(the test split gets the rest)"
        )
    if isinstance(section, settings.ClassifierSettings) and (
        section.positive_label not in section.labels
    ):
        problems.append(
            f"{name}.positive_label: {section.positive_label!r} is not one of "
            f"{name}.labels ({', '.join(section.labels)})"
        )
    if isinstance(section, FineTuningSection) and section.init_from == SCRATCH:
        problems.append(
            f"{name}.init_from: {SCRATCH!r} is pretrain's (random weights); a fine-tuning stage "
            f"starts from weights: {settings.INIT_FROM_HELP}"
        )
    return problems


def _cross_field_problems(config: Config) -> list[str]:
    """`key: problem` lines for settings that are each valid but contradict one another."""
    problems = _source_problems(config) + _training_problems(config)
    problems += _tokenizer_problems(config)
    for name, section in config.sections.items():
        problems += _section_problems(name, section)
    sizes = preset_sizes(config.resolved["model"])
    if sizes["n_embd"] % sizes["n_head"]:
        problems.append(
            f"model: n_embd ({sizes['n_embd']}) must be divisible by n_head ({sizes['n_head']})"
            f" (preset {config.model.preset} with the model section's overrides)"
        )
    return problems


def resolve(config: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """The config completed with every default, after checking it; ConfigError lists every key
    that does not match the schema, then what the schema alone cannot check."""
    config = coerce_numbers(root_settings(), config)
    errors = sorted(_validator().iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    problems = [line for e in errors for line in _describe(e).splitlines()]
    resolved = fill_defaults(root_settings(), config)
    if not errors:
        problems += _cross_field_problems(typed_config(resolved))
    if problems:
        details = "\n".join("  " + line for line in problems)
        raise ConfigError(f"invalid configuration ({source}):\n{details}")
    return resolved


def validate(config: Mapping[str, Any], source: str = "config") -> None:
    """Raise ConfigError listing every key that does not match the schema."""
    resolve(config, source)


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
        data = parse_yaml(Path(path).read_text())
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
    try:
        value = parse_yaml(raw) if raw else ""
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).strip()
        raise ConfigError(
            f"--set {key}: value {raw!r} is not valid YAML ({problem}); write a list as "
            "[a, b], a mapping as {k: v}, and quote a string holding [ ] { } : or #"
        ) from None
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return deep_merge(config, nested)


def load_config(
    paths: Iterable[Path | str] = (DEFAULT_CONFIG,), overrides: Iterable[str] = ()
) -> dict[str, Any]:
    """Read, merge, override, check and complete: the fully resolved configuration."""
    paths = [Path(p) for p in paths]
    config: dict[str, Any] = {}
    for path in paths:
        values = read_yaml(path)
        if (problem := not_a_config_file(path, values)) is not None:
            raise ConfigError(problem)
        config = deep_merge(config, values)
    for assignment in overrides:
        config = apply_override(config, assignment)
    return resolve(config, source=" + ".join(str(p) for p in paths) or "config")


def write_config(config: Mapping[str, Any], path: Path) -> None:
    """Write YAML atomically, leaving an unchanged file untouched (keeps its mtime)."""
    text = yaml.safe_dump(dict(config), sort_keys=False)
    path = Path(path)
    if path.exists() and path.read_text() == text:
        return
    atomic_write_text(path, text)
