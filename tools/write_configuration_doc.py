"""Writes docs/configuration.md from the settings table (``common.settings.reference_markdown``)."""

from __future__ import annotations

from pathlib import Path

from common.settings import reference_markdown

if __name__ == "__main__":
    target = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    target.write_text(reference_markdown())
    print(f"wrote {target}")
