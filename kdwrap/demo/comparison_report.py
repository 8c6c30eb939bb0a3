"""The report of ``kdwrap compare``: one row per deployed model, its accuracy over seeds, its paired differences to
plain and to the best free control with their 95 % intervals and verdicts, and what it cost to train.

The accuracy compared is the deployed model's after the last epoch (what ``kdwrap.export`` gives). The best epoch's
accuracy is shown beside it; it is picked on the test split, so it is an optimistic figure, not a deployable one.
The best control is the control (``plain-ls``, ``plain-ema``) with the higher mean accuracy: a method that is not
ahead of it gains nothing a user could not have for free.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .recipes import BASELINE, CONTROLS, RECIPES
from .seed_statistics import Difference, paired_difference, plot_curves, spread

__all__ = ["CompareRow", "compare_rows", "best_control", "format_compare_table", "compare_verdicts",
           "markdown_report", "write_outputs"]

REPORT_FILE, RESULTS_FILE, CURVES_FILE = "report.md", "comparison.json", "curves.png"


@dataclass
class CompareRow:
    """One deployed model of the comparison, over seeds (lists in seed order)."""

    name: str  # the row: plain, plain-ls, ONE, ONE-E, ...
    recipe: str  # the --methods name that trained it
    kind: str  # baseline, control or method
    last: list[float]  # test accuracy (%) of the deployed model after the last epoch
    best: list[float]  # the best test accuracy (%) over epochs
    best_epoch: list[int]
    step_seconds: float  # mean over seeds
    peak_memory: int | None  # bytes, the largest over seeds; None where not measured
    params_trained: int
    params_deployed: int
    files: list[str | None] = field(default_factory=list)  # each seed's saved state_dict


def compare_rows(results: list[dict[str, Any]], seeds: list[int], recipes: list[str]) -> list[CompareRow]:
    """The rows in table order (recipes in table order; a recipe's deployed models in the order it names them)."""
    by = {(r["recipe"], r["seed"]): r for r in results}
    rows = []
    for recipe in recipes:
        runs = [by[(recipe, s)] for s in seeds]
        for name in runs[0]["models"]:
            curves = [r["curves"][name] for r in runs]
            rows.append(CompareRow(
                name, recipe, RECIPES[recipe].kind, [r["models"][name]["accuracy"] for r in runs],
                [max(c) for c in curves], [c.index(max(c)) + 1 for c in curves],
                sum(r["step_seconds"] for r in runs) / len(runs),
                max((r["peak_memory"] for r in runs if r["peak_memory"] is not None), default=None),
                runs[0]["params_trained"], runs[0]["models"][name]["params"],
                [r["models"][name].get("file") for r in runs]))
    return rows


def best_control(rows: list[CompareRow]) -> CompareRow | None:
    """The control with the higher mean accuracy (after the last epoch), or None when no control was trained."""
    controls = [r for r in rows if r.kind == "control" and r.name in CONTROLS]
    return max(controls, key=lambda r: spread(r.last).mean) if controls else None


def _differences(rows: list[CompareRow]) -> dict[str, tuple[Difference | None, Difference | None]]:
    """Row name -> (difference to plain, difference to the best control); None where a row is its own reference."""
    plain = next(r for r in rows if r.name == BASELINE)
    control = best_control(rows)
    return {r.name: (paired_difference(r.last, plain.last) if r is not plain else None,
                     paired_difference(r.last, control.last) if control and r is not control else None)
            for r in rows}


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def _cells(rows: list[CompareRow]) -> tuple[list[str], list[list[str]]]:
    control = best_control(rows)
    diffs = _differences(rows)
    plain_step = next(r for r in rows if r.name == BASELINE).step_seconds
    header = ["method", "last epoch: mean ± std", "best epoch", "vs plain [95 % CI]", "verdict",
              f"vs {control.name if control else 'best control'} [95 % CI]", "verdict", "step vs plain",
              "peak memory", "params trained / deployed"]
    body = []
    for r in rows:
        to_plain, to_control = diffs[r.name]
        body.append([
            r.name, str(spread(r.last)), str(spread(r.best)),
            str(to_plain) if to_plain else "(baseline)", to_plain.verdict if to_plain else "",
            str(to_control) if to_control else ("(best control)" if control else "(no control trained)"),
            to_control.verdict if to_control else "",
            f"{r.step_seconds / plain_step:.2f}x" if plain_step > 0 else "-", _fmt_bytes(r.peak_memory),
            f"{_fmt_params(r.params_trained)} / {_fmt_params(r.params_deployed)}"])
    return header, body


def format_compare_table(rows: list[CompareRow]) -> str:
    """The rows as an aligned Markdown table."""
    header, body = _cells(rows)
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body])


# What each verdict says in a sentence, against a reference.
_SAY = {"gain beyond noise": "ahead of {ref} beyond noise", "loss beyond noise": "behind {ref} beyond noise",
        "within noise": "not distinguishable from {ref} (within noise)",
        "no verdict (1 seed)": "no verdict against {ref} (one seed gives no interval: run more seeds)"}


def compare_verdicts(rows: list[CompareRow]) -> list[str]:
    """One sentence per method row: its difference to plain and to the best control, and what each means."""
    control = best_control(rows)
    diffs = _differences(rows)
    lines = []
    for r in rows:
        to_plain, to_control = diffs[r.name]
        if to_plain is None:
            continue
        text = f"{r.name}: {to_plain.mean:+.2f} points vs plain, {_SAY[to_plain.verdict].format(ref='plain')}"
        if to_control is not None and r.kind == "method":
            text += (f"; {to_control.mean:+.2f} vs {control.name}, "  # type: ignore[union-attr]
                     f"{_SAY[to_control.verdict].format(ref=control.name)}")  # type: ignore[union-attr]
        lines.append(text + (f" ({to_plain.n} seeds)" if to_plain.n > 1 else ""))
    return lines


def _relative(file: str | None) -> str:
    """A saved state_dict as the report names it: relative to the report's folder."""
    return f"state_dicts/{Path(file).name}" if file else "-"


def markdown_report(rows: list[CompareRow], settings: dict[str, Any], verdicts: list[str], table: str,
                    curves_file: str | None) -> str:
    seeds = settings["seeds"]
    per_seed = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " | state_dict (first seed) |",
                "|---|" + "---|" * len(seeds) + "---|"]
    per_seed += [f"| {r.name} | " + " | ".join(f"{a:.2f} (best {b:.2f}, epoch {e})" for a, b, e in
                                               zip(r.last, r.best, r.best_epoch)) + f" | {_relative(r.files[0])} |"
                 for r in rows]
    options = settings.get("options") or {}
    what = [f"- `{name}`: {RECIPES[name].what}" + (
        "; options: " + ", ".join(f"{k}={v!r}" for k, v in options[name].items()) if options.get(name) else "")
        for name in settings["methods"]]
    return "\n".join([
        f"# kdwrap compare: {settings['model']} on {settings['data']}", "",
        f"{settings['train']:,} training / {settings['test']:,} test images, {settings['image']}, "
        f"{settings['classes']} classes; {settings['epochs']} epochs, batch {settings['batch_size']}, SGD nesterov "
        f"lr {settings['lr']} cosine, weight decay {settings['weight_decay']}, "
        f"{'pad-4 crop + flip' if settings['augment'] else 'no augmentation'}; seeds {seeds}; on {settings['device']}"
        f"{' (bfloat16 autocast, channels_last)' if settings.get('amp') else ''}.", "",
        *what, "", table, "", *[f"- {v}" for v in verdicts], "",
        "Accuracy is the deployed model's (kdwrap.export) on the test split after the last epoch; 'best epoch' is "
        "the highest test accuracy over epochs, picked on the test split (optimistic). Differences are paired by "
        "seed (same initial weights and data order) with their 95 % t-interval; 'beyond noise' when it excludes 0. "
        "The best control is the control with the higher mean. Step time is relative to plain's, measured while "
        "the trainings ran side by side; peak memory is CUDA memory allocated on a GPU, the training process's "
        "peak resident memory on a CPU.", "",
        "## Per seed (last epoch)", "", *per_seed, "",
        *([f"![test accuracy per epoch]({curves_file})", ""] if curves_file else []),
    ])


def write_outputs(out: Path, rows: list[CompareRow], settings: dict[str, Any], verdicts: list[str], table: str,
                  curves: dict[str, list[list[float]]], wall: float) -> list[Path]:
    """``comparison.json``, ``report.md`` and ``curves.png`` (when matplotlib is installed) under ``out``."""
    title = (f"kdwrap compare: {settings['model']} on {settings['data']}, {settings['epochs']} epochs, seeds "
             f"{settings['seeds']}\ntest accuracy of the deployed model; mean, band: min-max over seeds")
    control = best_control(rows)
    written = []
    if plot_curves(curves, out / CURVES_FILE, title):
        written.append(out / CURVES_FILE)
    (out / RESULTS_FILE).write_text(json.dumps(
        {"settings": settings, "wall_seconds": round(wall, 1), "rows": [asdict(r) for r in rows],
         "best_control": control.name if control else None,
         "verdicts": verdicts, "curves": curves}, indent=1) + "\n")
    (out / REPORT_FILE).write_text(markdown_report(rows, settings, verdicts, table,
                                                   CURVES_FILE if written else None) + "\n")
    return [out / RESULTS_FILE, out / REPORT_FILE, *written]
