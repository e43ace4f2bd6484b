"""Stages and the training loop read settings as attributes of the settings classes, never by
string key: a misspelt setting is then a type error (`make lint`'s pyright), not a user's
KeyError at run time. This finds the string-key lookups pyright cannot see (on a `Mapping`)."""

import ast
from pathlib import Path

import pipeline

ROOT = Path(pipeline.__file__).parent
CHECKED = ("stages", "train")
SETTINGS_NAMES = {
    "config", "resolved", "section", "settings", "cfg", "train", "tracking", "resources",
    "model_section", "lora", "generation", "split", "paths", "prepare", "data",
}  # fmt: skip
"""Names a settings value goes by: a string key on one of these is a settings lookup."""
UNTYPED = {"Mapping", "dict", "MutableMapping"}


def _name(node: ast.expr) -> str | None:
    """The variable or attribute a lookup is made on: `config` in `config["a"]`, `section` in
    `self.section["a"]`, `config` in `config["a"]["b"]`."""
    while isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else None


def _string_key(node: ast.AST) -> ast.expr | None:
    """The object of `x["key"]` or `x.get("key", ...)`, else None."""
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return node.value if isinstance(node.slice.value, str) else None
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return node.func.value
    return None


def _untyped_parameter(arg: ast.arg) -> bool:
    """A settings-named parameter annotated as a plain mapping (`config: Mapping[str, Any]`)."""
    annotation = arg.annotation
    if arg.arg not in SETTINGS_NAMES or annotation is None:
        return False
    base = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    return _name(base) in UNTYPED


def settings_lookups(source: str, filename: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        target = _string_key(node)
        if target is not None and _name(target) in SETTINGS_NAMES:
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                if _untyped_parameter(arg):
                    found.append(f"{filename}:{node.lineno}: {node.name}({arg.arg}: untyped)")
    return found


def test_stages_and_the_training_loop_read_settings_as_attributes():
    found = [
        line
        for package in CHECKED
        for path in sorted((ROOT / package).rglob("*.py"))
        for line in settings_lookups(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert found == [], "settings looked up by string key:\n" + "\n".join(found)


def test_the_check_finds_each_kind_of_lookup():
    source = """
def setup(config: Mapping[str, Any], section: dict) -> None:
    lr = config["pretrain"]["train"]["lr"]
    seed = config.get("seed", 0)
    steps = self.section["train"]
    rows = metrics["val_loss"], record.get("input")  # not settings
"""
    found = settings_lookups(source, "x.py")
    assert sorted(line.split(": ", 1)[1] for line in found) == sorted(
        [
            "setup(config: untyped)",
            "setup(section: untyped)",
            "config['pretrain']['train']['lr']",
            "config['pretrain']['train']",
            "config['pretrain']",
            "config.get('seed', 0)",
            "self.section['train']",
        ]
    )
