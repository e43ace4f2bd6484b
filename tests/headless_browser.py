"""A real headless Chromium for tests that check what a user's browser shows: the DOM text a page
builds with its scripts, and a screenshot of it."""

import html
import re
import shutil
import subprocess
from pathlib import Path

SKIP_REASON = "no chromium that starts (.ci/run installs it where apt can)"


def browser() -> str | None:
    """A headless Chromium that starts (Ubuntu's `chromium-browser` may be a stub for a snap)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if (
            path
            and subprocess.run([path, "--version"], capture_output=True, timeout=60).returncode == 0
        ):
            return path
    return None


def _chromium(profile: Path, budget_ms: int) -> list[str]:
    # virtual time lets a JavaScript app's scripts build the page before it is read
    return [browser(), "--headless", "--no-sandbox", "--disable-gpu",
            f"--virtual-time-budget={budget_ms}", f"--user-data-dir={profile}"]  # fmt: skip


def dump_dom(url: str, profile: Path, budget_ms: int = 10000) -> str:
    """The page's DOM once its scripts ran."""
    return subprocess.run(
        [*_chromium(profile, budget_ms), "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip


def visible_text(dom: str) -> str:
    """The DOM's text, without scripts, styles and tags, entities decoded and whitespace
    (&nbsp; too) collapsed."""
    text = re.sub(r"<script.*?</script>|<style.*?</style>|<[^>]+>", " ", dom, flags=re.S)
    return " ".join(html.unescape(text).split())


def screenshot(url: str, shot: Path, profile: Path, budget_ms: int = 10000) -> None:
    """A PNG of the page at 1280x900; fails unless one is written."""
    cmd = [*_chromium(profile, budget_ms), "--window-size=1280,900", f"--screenshot={shot}", url]
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"no PNG screenshot of {url}"
