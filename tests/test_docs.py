"""The documentation that is generated stays current, and the README stays a README."""

from __future__ import annotations

import re
from pathlib import Path

from common.settings import SETTINGS, reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_the_configuration_reference_is_current():
    """docs/configuration.md is what ``make docs`` writes from SETTINGS today."""
    written = (ROOT / "docs" / "configuration.md").read_text()
    assert written == reference_markdown(), "docs/configuration.md is stale: run `make docs`"
    assert all(f"`{s.flag}`" in written for s in SETTINGS)


def test_the_readme_fits_on_a_screen_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for page in ("api", "configuration", "deployment", "reproducibility", "performance"):
        assert f"(docs/{page}.md)" in readme
        assert (ROOT / "docs" / f"{page}.md").exists()


def test_measurement_pointers_name_sections_of_the_performance_document():
    """Code points to docs/performance.md for the figures behind a choice: every section it names exists."""
    headings = set(re.findall(r"^### (.+)$", (ROOT / "docs" / "performance.md").read_text(), re.M))
    pointer = re.compile(r'docs/performance\.md,[\s#*]*"([^"]+)"')
    named = {}
    for package in ("common", "router", "facade", "shard", "launcher"):
        for path in [*(ROOT / package).rglob("*.py"), *(ROOT / package).rglob("*.c")]:
            for section in pointer.findall(path.read_text()):
                named[section] = path
    assert len(named) >= 10
    assert {s: str(p) for s, p in named.items() if s not in headings} == {}
