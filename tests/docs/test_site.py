"""The documentation site builds with `mkdocs build --strict` (a broken link or anchor, or a page
missing from the nav, fails it), its reference pages are rendered from the code, and a real
headless Chromium shows its navigation and a tutorial."""

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from headless_browser import SKIP_REASON, browser, dump_dom, screenshot, visible_text

from pipeline.cli import build_parser
from pipeline.settings.load import json_schema
from pipeline.stages.registry import EXTRA_STAGES_ENV, STAGES

REPO = Path(__file__).resolve().parents[2]
MKDOCS = Path(sys.executable).parent / "mkdocs"

EXTRA_STAGE = '''
"""A stage kept outside the repository: only the registry knows it."""
from dataclasses import dataclass

from pipeline.settings import TrainSettings
from pipeline.settings.schema import setting
from pipeline.stages.registry import Stage, fine_tuning_inputs, register


@dataclass
class DistillSettings:
    init_from: str = setting("finetune-instruct", help="the teacher")
    data: str = setting("instruction-data.json")
    temperature: float = setting(2.0, exclusiveMinimum=0, help="softens the teacher's logits")
    train: TrainSettings = setting(TrainSettings())


register(Stage("distill", "docs_extra_stage", DistillSettings, trains=True,
               outputs=("loss.png",), inputs=fine_tuning_inputs("distill")))
'''


def build(site: Path, config: Path = REPO / "mkdocs.yml", **env: str):
    """`mkdocs build --strict` of `config` into `site`, in its own process."""
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1", **env},
    )  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = build(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def page_text(site: Path, page: str) -> str:
    return visible_text((site / page / "index.html").read_text())


def test_every_nav_page_is_built(site):
    nav = (REPO / "mkdocs.yml").read_text().split("\nnav:\n", 1)[1]
    pages = [line.rsplit(": ", 1)[-1].strip() for line in nav.splitlines() if line.strip()]
    pages = [page for page in pages if page.endswith(".md")]
    assert len(pages) >= 20
    for page in pages:
        built = site / ("index.html" if page == "index.md" else page[:-3] + "/index.html")
        assert built.is_file(), f"{page}: not built"


def schema_leaves(schema, prefix=""):
    for name, prop in schema.get("properties", {}).items():
        if "properties" in prop:
            yield from schema_leaves(prop, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", prop


def test_the_settings_reference_lists_every_setting_from_the_settings_classes(site):
    text = page_text(site, "reference/settings")
    leaves = dict(schema_leaves(json_schema()))
    assert len(leaves) > 100
    missing = [key for key in leaves if key not in text]
    assert not missing, f"settings missing from the reference: {missing[:10]}"
    lr = leaves["pretrain.train.lr"]
    assert f"pretrain.train.lr number {lr['default']} > 0" in text
    assert "prepare.corpus[].path" in text  # a list's entries, from their settings class


def test_the_cli_reference_is_the_argparse_parser(site):
    text = page_text(site, "reference/cli")
    commands = dict(next(a for a in build_parser()._actions if a.dest == "command").choices or {})
    for name, parser in commands.items():
        assert f"usage: python -m pipeline {name}" in text
        for action in parser._actions:
            assert all(option in text for option in action.option_strings), (name, action)
    assert "--keep-resume-state" in text and "--max-new-tokens" in text


def test_the_stages_reference_is_the_registry(site):
    text = page_text(site, "reference/stages")
    for stage in STAGES.values():
        assert f"python -m pipeline {stage.name}" in text and stage.rule in text
    assert "test_f1 (higher is better)" in text  # finetune-classifier's headline
    assert "data: data/raw/SMSSpamCollection" in text  # its rule's input, default config


def test_a_stage_registered_from_outside_shows_in_every_reference_page(tmp_path):
    (tmp_path / "docs_extra_stage.py").write_text(EXTRA_STAGE)
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    env = {"PYTHONPATH": path, EXTRA_STAGES_ENV: "docs_extra_stage"}
    done = build(tmp_path / "site", REPO / "mkdocs.yml", **env)
    assert done.returncode == 0, done.stderr[-3000:]
    settings = page_text(tmp_path / "site", "reference/settings")
    assert "distill.temperature number 2.0 > 0 softens the teacher's logits" in settings
    assert "usage: python -m pipeline distill" in page_text(tmp_path / "site", "reference/cli")
    stages = page_text(tmp_path / "site", "reference/stages")
    assert "python -m pipeline distill" in stages and "data/raw/instruction-data.json" in stages


def test_the_picture_of_the_dag_has_every_stage():
    """docs/images/dag.svg is `make docs-dag`'s; a stage added since would be missing from it."""
    svg = (REPO / "docs" / "images" / "dag.svg").read_text()
    drawn = set(re.findall(r"<text[^>]*>([a-z_]+)</text>", svg))
    missing = {stage.rule for stage in STAGES.values()} - drawn
    assert not missing, f"docs/images/dag.svg lacks {sorted(missing)}: run make docs-dag"


def test_a_broken_link_or_an_unknown_reference_marker_fails_the_build(tmp_path):
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    config = tmp_path / "mkdocs.yml"
    config.write_text((REPO / "mkdocs.yml").read_text())
    page = tmp_path / "docs" / "explanations" / "model.md"
    original = page.read_text()
    page.write_text(original + "\nSee [the design](design.md#no-such-section).\n")
    done = build(tmp_path / "site", config)
    assert done.returncode != 0
    assert "'explanations/model.md' contains a link 'design.md#no-such-section'" in done.stderr
    page.write_text(original + "\n<!-- reference: setings -->\n")
    done = build(tmp_path / "site", config)
    assert done.returncode != 0 and "unknown reference marker 'setings'" in done.stderr


@pytest.fixture
def served(site):
    """The built site over HTTP on 127.0.0.1 (the search and navigation scripts need http)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.skipif(browser() is None, reason=SKIP_REASON)
def test_the_navigation_and_a_tutorial_render_in_a_headless_browser(served, tmp_path):
    profile = tmp_path / "profile"
    home = visible_text(dump_dom(f"{served}/", profile))
    entries = (
        "Tutorials",
        "Reference",
        "Explanations",
        "The default pipeline and its results",
        "Settings",
        "Command line",
        "Stages",
        "The fused attention kernel",
        "Benchmarks",
    )
    for entry in entries:
        assert entry in home, f"navigation entry {entry!r} not shown"
    tutorial = dump_dom(f"{served}/tutorials/pipeline/", profile)
    assert "<h1" in tutorial and "make pipeline" in visible_text(tutorial)
    assert 'class="md-nav__link md-nav__link--active"' in tutorial  # its nav entry, highlighted
    screenshot(f"{served}/tutorials/pipeline/", tmp_path / "tutorial.png", profile)
