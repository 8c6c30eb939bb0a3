"""Helpers shared by the benchmark scripts: markdown tables, an optional matplotlib, files that are always whole, and
the deadline that makes a script stop starting new work in time to write what it measured."""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
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


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON in ``path``, through a temporary file renamed over it: a reader, a packer or a kill in the
    middle never meets half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    """Like :func:`write_json`, for text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _process_start() -> float:
    """``time.monotonic()`` when this process started (Linux's /proc), else now: a deadline counts the imports too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.monotonic() - max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic()


class Deadline:
    """``seconds`` after the script's process started (``None``: none). A script asks :meth:`allows` before each
    piece of work with what it expects that work to take, plus the time to write its table and plot."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._at = None if seconds is None else _process_start() + seconds

    def left(self) -> float:
        return math.inf if self._at is None else self._at - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


class Stopped(Exception):
    """SIGTERM arrived (``timeout``, the end of a device call): the script writes what it has, then exits."""


def stop_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Stopped`, so that a killed script still writes its table and plot."""
    def handler(signum: int, frame: Any) -> None:
        raise Stopped()

    signal.signal(signal.SIGTERM, handler)


ROOT = Path(__file__).resolve().parents[1]


def portable_path(arg: str) -> str:
    """An argument as a result's JSON records it: a path inside the repository relative to it, another absolute path
    (a temporary folder, a device call's output folder) by its last part, so that a record names no folder of the
    machine it ran on; ``--opt=/a/path`` likewise; anything else unchanged."""
    if not arg.startswith("/"):
        opt, eq, value = arg.partition("=")
        return f"{opt}={portable_path(value)}" if eq and opt.startswith("-") and value.startswith("/") else arg
    path = Path(arg)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def command_line(script: str, argv: list[str]) -> str:
    """The command that produced a result, as its JSON records it: ``python script`` and each argument through
    :func:`portable_path`."""
    return " ".join(["python", script, *map(portable_path, argv)])


def read_rows(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], str]:
    """``(meta, rows, not_measured, state)`` of a benchmark's JSON, finished or cut short; ``state`` is the note a
    table's title gets when the run stopped before its end."""
    data = json.loads(Path(path).read_text())
    meta = data["meta"]
    state = "" if meta.get("complete") else "; PARTIAL: the run stopped before its end"
    return meta, data["results"], data.get("not_measured", []), state
