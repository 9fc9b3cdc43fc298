"""Plain-text tables for the commands' output (`gannet demo`, `bench`, `dead-letters`)."""

from __future__ import annotations


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, as wide as their widest cell, under a dashed rule."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
