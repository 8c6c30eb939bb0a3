"""Helpers shared by the benchmark scripts: markdown tables and an optional matplotlib."""
from __future__ import annotations

from typing import Any, Sequence


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table with padded columns, as the docs quote it."""
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([row(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(row, body)])


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return None
    return plt
