"""The accuracy benchmark's tables: one row per reported model from the runs' history.json, with each seed's values,
mean ± std, and the paired differences to the baseline and to the stronger free control (benchmarks/accuracy.py)."""
from __future__ import annotations

import json
import statistics
from typing import Any, Callable

from accuracy_protocols import LABELS
from common import markdown_table

from kdwrap.demo.seed_statistics import paired_difference, spread

# A method whose runs report a second model beside the deployed one: (history key suffix, label of the deployed
# row, label of the second row), from the variant's label. ONE: its gated ensemble; PCL: the live peer whose
# temporal mean it deploys (a weight average: the live peer shows what the averaging adds).
SECOND_MODELS: dict[str, tuple[str, Callable[[str], str], Callable[[str], str]]] = {
    "one": ("_ensemble", lambda label: f"{label} (branch 0)", lambda label: label.replace("ONE", "ONE-E", 1)),
    "pcl": ("_live_peer", lambda label: label,
            lambda label: label.replace("temporal mean of peer 0", "live peer 0, not deployed")),
}


def reported_models(variant: str, fill: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(row label, history key suffix) of the models a variant's runs report: ONE gives branch 0 and ONE-E, PCL
    its deployed temporal mean and its live peer. ``fill``: the label's placeholders (:func:`placeholders`)."""
    label = LABELS[variant].format_map(fill or {})
    second = SECOND_MODELS.get(variant.split("-")[0])
    if second is None:
        return [(label, "")]
    suffix, deployed, other = second
    return [(deployed(label), ""), (other(label), suffix)]


def summarise(runs: list[dict[str, Any]], variants: list[str],
              earlier: tuple[list[dict[str, Any]], ...] = (),
              fill: dict[str, str] | None = None, baseline: str = "plain",
              controls: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One row per reported model, with its seeds' values (those of ``runs`` and of the ``earlier`` rows of other
    runs of the same setup, see :func:`merge_rows`) and its paired difference to plain (seeds that both have).
    ``fill``: the labels' placeholders (:func:`placeholders`)."""
    def history(r: dict[str, Any]) -> dict[str, Any] | None:
        try:
            h = json.loads((r["out"] / "history.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return h if h.get("epochs") else None

    done = {(r["variant"], r["seed"]): h for r in runs if (h := history(r))}
    rows = []
    for variant in variants:
        hists = {seed: h for (v, seed), h in sorted(done.items()) if v == variant}
        if not hists:
            continue
        for label, suffix in reported_models(variant, fill):
            key = f"test_acc{suffix}"
            if any(key not in e for h in hists.values() for e in h["epochs"]):
                continue  # runs recorded before that model was logged
            rows.append({
                "reported": label, "variant": variant, "seeds": list(hists),
                "epochs_done": [len(h["epochs"]) for h in hists.values()],
                "best": [max(e[key] for e in h["epochs"]) for h in hists.values()],
                "last": [h["epochs"][-1][key] for h in hists.values()],
                "train_acc_last": [h["epochs"][-1].get("train_acc") for h in hists.values()],
                "epoch_seconds_median": statistics.median(e["seconds"] for h in hists.values() for e in h["epochs"]),
                "curves": [[e[key] for e in h["epochs"]] for h in hists.values()],
            })
            if suffix == "" and any("parts" in e for h in hists.values() for e in h["epochs"]):
                # the loss's scalar parts per epoch and seed (OSAKD's soft-label diagnostics among them)
                rows[-1]["parts"] = [[e.get("parts") for e in h["epochs"]] for h in hists.values()]
    for old in earlier:
        rows = merge_rows(rows, old)
    return add_statistics(rows, baseline, controls)


PER_SEED = ("epochs_done", "best", "last", "train_acc_last", "curves")


def merge_rows(rows: list[dict[str, Any]], earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with the seeds of ``earlier`` rows (from an earlier JSON of the same protocol) added; a seed in both
    keeps this run's values. Rows only in ``earlier`` are kept too."""
    raw = ("reported", "variant", "epoch_seconds_median", "seeds", *PER_SEED)
    merged = {r["reported"]: {k: (list(r[k]) if isinstance(r[k], list) else r[k]) for k in raw} for r in rows}
    for r in rows:  # the loss's parts stay with this run's seeds, named, as earlier files may not have them
        if "parts" in r:
            merged[r["reported"]]["parts"] = dict(zip(r["seeds"], r["parts"]))
    for old in earlier:
        row = merged.setdefault(old["reported"], {k: old[k] for k in raw[:3]} | {k: [] for k in raw[3:]})
        for i, seed in enumerate(old["seeds"]):
            if seed not in row["seeds"]:
                row["seeds"].append(seed)
                for k in PER_SEED:
                    row[k].append(old[k][i])
        order = sorted(range(len(row["seeds"])), key=row["seeds"].__getitem__)
        for k in ("seeds", *PER_SEED):
            row[k] = [row[k][i] for i in order]
    return list(merged.values())


def add_statistics(rows: list[dict[str, Any]], baseline: str = "plain",
                   controls: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Mean ± std over seeds per row, and each row's paired difference to the ``baseline`` variant's (plain by
    default) over the seeds both have; with ``controls``, also to the stronger control of each reading (the control
    row with the higher mean), as ``<kind>_diff_control`` naming it."""
    base = next((r for r in rows if r["variant"] == baseline), None)
    # The deployed model of each control: its variant's first row (a second row, such as a live peer, is not).
    control_rows = [next(r for r in rows if r["variant"] == c) for c in controls if any(r["variant"] == c for r in rows)]
    for row in rows:
        for kind in ("best", "last"):
            sp = spread(row[kind])
            row[f"{kind}_mean"], row[f"{kind}_std"] = sp.mean, sp.std
    stronger = {kind: max(control_rows, key=lambda c: c[f"{kind}_mean"]) if control_rows else None
                for kind in ("best", "last")}
    for row in rows:
        row["baseline"] = row is base
        for kind in ("best", "last"):
            if row is not base and base is not None:
                diff = paired_to(row, base, kind)
                if diff is not None:
                    row[f"{kind}_diff"] = diff
            best = stronger[kind]
            if best is not None and row is not best:
                diff = paired_to(row, best, kind)
                if diff is not None:
                    row[f"{kind}_diff_control"] = {**diff, "control": best["reported"]}
    return rows


def paired_to(row: dict[str, Any], other: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """``row``'s paired difference to ``other`` over the seeds both have (None: no seed in common)."""
    paired = [s for s in row["seeds"] if s in other["seeds"]]
    if not paired:
        return None
    mine = [row[kind][row["seeds"].index(s)] for s in paired]
    theirs = [other[kind][other["seeds"].index(s)] for s in paired]
    d = paired_difference(mine, theirs)
    return {"mean": d.mean, "low": d.low, "high": d.high, "seeds": paired, "verdict": d.verdict, "text": str(d)}


def format_table(rows: list[dict[str, Any]], kind: str) -> str:
    """The table for ``kind`` = "best" (max over epochs) or "last" (final epoch)."""
    base = next((r["reported"] for r in rows if r.get("baseline", r["variant"] == "plain")), "plain")
    controls = any(f"{kind}_diff_control" in r for r in rows)
    header = ["reported model", f"{kind} epoch: mean ± std", "per seed", f"vs {base} [95 % CI]", "verdict"]
    header += ["vs the stronger control [95 % CI]", "verdict"] if controls else []
    header += ["train acc (last)", "s / epoch"]
    body = []
    for r in rows:
        diff = r.get(f"{kind}_diff")
        cells = [r["reported"], f"{r[f'{kind}_mean']:.2f} ± {r[f'{kind}_std']:.2f}",
                 " / ".join(f"{v:.2f}" for v in r[kind]), diff["text"] if diff else "(baseline)",
                 diff["verdict"] if diff else ""]
        if controls:
            c = r.get(f"{kind}_diff_control")
            cells += [f"{c['text']} vs {c['control']}" if c else "(the stronger control)" if any(
                      x.get(f"{kind}_diff_control", {}).get("control") == r["reported"] for x in rows) else "",
                      c["verdict"] if c else ""]
        train = [v for v in r["train_acc_last"] if v is not None]
        body.append(cells + [f"{sum(train) / len(train):.1f}" if train else "n/a", f"{r['epoch_seconds_median']:.1f}"])
    return markdown_table(header, body)
