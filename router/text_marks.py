"""Marks a stream must not release before they are whole: stop sequences, tool-call triggers,
think tags. Text that could still be a mark's beginning is held back until the next token
says whether it is."""

from __future__ import annotations


def partial_mark(text: str, mark: str, start: int = 0, end: int | None = None) -> int:
    """Length of the longest proper prefix of ``mark`` that ``text[start:end]`` ends with (0: none)."""
    end = len(text) if end is None else end
    for n in range(min(len(mark) - 1, end - start), 0, -1):
        if text.endswith(mark[:n], start, end):
            return n
    return 0
