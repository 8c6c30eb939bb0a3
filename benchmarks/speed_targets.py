"""ONE's speed targets (step ratio to plain, `auto` against sequential, peak memory), checked against the JSON
that benchmarks/speed.py writes.

    python benchmarks/speed_targets.py benchmarks/results/device/              # every speed_*.json in a folder
    python benchmarks/speed_targets.py speed_eager.json speed_models.json

For each model, number of branches and compile setting found in the files, one row per target:

* **step ratio**: ONE as a user runs it (the ``auto`` row) against the plain step, at most 1.25x for CIFAR
  ResNet-32 and 1.20x for timm resnet50 with 3 branches. Other models get no ratio target.
* **auto vs sequential**: ``auto`` is never slower than sequential by more than the run-to-run spread (the larger
  interquartile range of the two rows).
* **peak memory**: ``auto`` and fused at most sequential's peak plus 10 %. Rows without a peak (CPU) say n/a.

The ratio targets are for eager steps; compiled rows get the other two checks. Prints a markdown table and exits
1 if a target is missed or its plain row is missing, 0 otherwise. ``not run`` marks a check whose ``auto`` row the
run left out (``speed.py --variants``), ``not measured`` one whose row the file lists as not measured (a deadline
or a stop came first), ``n/a`` a memory check on a device that reports no peak memory: none counts as met.
``--out FILE`` also writes the verdicts as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table  # noqa: E402

# (model, branches) -> the largest ONE/plain step ratio allowed, measured on eager steps
RATIO_TARGETS = {("cifar_resnet32", 3): 1.25, ("resnet50", 3): 1.20}
MEMORY_SLACK = 1.10


def load_rows(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """The result rows of every speed.py JSON named (folders: their ``speed_*.json``), each tagged with its file,
    and its rows not measured (``not_measured``: the reason)."""
    rows = []
    for path in paths:
        files = sorted(path.glob("speed_*.json")) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise SystemExit(f"{path}: no speed_*.json in this folder")
        for f in files:
            data = json.loads(f.read_text())
            if "results" not in data:
                raise SystemExit(f"{f}: not a benchmarks/speed.py result (no 'results' key)")
            for r in data["results"]:
                rows.append({**r, "file": f.name})
            for r in data.get("not_measured", []):
                rows.append({**r, "file": f.name, "not_measured": r["reason"]})
    return rows


def _one_variant(variant: str) -> tuple[int, str] | None:
    """'ONE m=3 fused +compile' -> (3, 'fused'); None for other variants."""
    parts = variant.split()
    if len(parts) < 3 or parts[0] != "ONE" or not parts[1].startswith("m="):
        return None
    return int(parts[1][2:]), parts[2]


def _ran(row: dict[str, Any]) -> str:
    """Which execution an ``auto`` row ran (speed.py records ``{"plan": ...}``)."""
    ex = row.get("execution")
    return str(ex.get("plan")) if isinstance(ex, dict) else str(ex)


def check(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One verdict per target and setting: ``met``, ``missed``, ``missing`` (a row is absent), ``not run``, ``not
    measured`` or ``n/a``."""
    groups: dict[tuple[str, str, bool, int], dict[str, dict[str, Any]]] = {}
    plains: dict[tuple[str, str, bool], dict[str, Any]] = {}
    absent: set[tuple[str, str, bool, int, str]] = set()  # ONE rows the file lists as not measured
    for r in rows:
        setting = (r["model"], r["file"], bool(r.get("compiled")) or "+compile" in r["variant"])
        if "not_measured" in r:
            parsed = _one_variant(r["variant"])
            if parsed is not None:
                groups.setdefault((*setting, parsed[0]), {})
                absent.add((*setting, *parsed))
            continue
        if r["variant"].split()[0] == "plain":
            plains[setting] = r
            continue
        parsed = _one_variant(r["variant"])
        if parsed is not None:
            groups.setdefault((*setting, parsed[0]), {})[parsed[1]] = r
    out = []
    for (model, file, compiled, m), ex in sorted(groups.items()):
        where = {"model": model, "branches": m, "compiled": compiled, "file": file}
        auto, seq, fused = ex.get("auto"), ex.get("sequential"), ex.get("fused")
        plain = plains.get((model, file, compiled))
        unmeasured = {e for (*setting, n, e) in absent if tuple(setting) == (model, file, compiled) and n == m}
        limit = None if compiled else RATIO_TARGETS.get((model, m))  # the targets are for eager steps
        if limit is not None:
            if auto is None or plain is None:
                verdict = "not measured" if "auto" in unmeasured else "missing" if plain is None else "not run"
                out.append({**where, "target": f"auto <= {limit:.2f}x plain", "value": "", "verdict": verdict})
            else:
                ratio = auto["step_ms"] / plain["step_ms"]
                out.append({**where, "target": f"auto <= {limit:.2f}x plain", "value": f"{ratio:.3f}x",
                            "verdict": "met" if ratio <= limit else "missed"})
        if seq is None and "sequential" in unmeasured:
            out.append({**where, "target": "auto <= sequential + spread", "value": "", "verdict": "not measured"})
        if seq is not None:
            if auto is None:  # speed.py --variants left auto out of this run (the cudagraphs step does)
                verdict = "not measured" if "auto" in unmeasured else "not run"
                out.append({**where, "target": "auto <= sequential + spread", "value": "", "verdict": verdict})
            else:
                spread = max(auto.get("step_ms_iqr") or 0.0, seq.get("step_ms_iqr") or 0.0)
                diff = auto["step_ms"] - seq["step_ms"]
                out.append({**where, "target": "auto <= sequential + spread",
                            "value": f"{diff:+.2f} ms (spread {spread:.2f}, auto ran {_ran(auto)})",
                            "verdict": "met" if diff <= spread else "missed"})
        for name, r in (("auto", auto), ("fused", fused)):
            if r is None or seq is None:
                continue
            if r.get("peak_gib") is None or seq.get("peak_gib") is None:
                out.append({**where, "target": f"{name} peak <= sequential + 10%", "value": "", "verdict": "n/a"})
                continue
            frac = r["peak_gib"] / seq["peak_gib"]
            out.append({**where, "target": f"{name} peak <= sequential + 10%", "value": f"{frac:.3f}x",
                        "verdict": "met" if frac <= MEMORY_SLACK else "missed"})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="speed.py JSON files, or folders holding speed_*.json")
    ap.add_argument("--out", type=Path, default=None, help="also write the verdicts as JSON")
    args = ap.parse_args(argv)
    for p in args.paths:
        if not p.exists():
            raise SystemExit(f"{p}: no such file or folder")
    verdicts = check(load_rows(args.paths))
    if not verdicts:
        raise SystemExit("no ONE rows in these files: run benchmarks/speed.py (ONE variants) first")
    print(markdown_table(
        ["file", "model", "m", "compiled", "target", "value", "verdict"],
        [[v["file"], v["model"], str(v["branches"]), "yes" if v["compiled"] else "no", v["target"], v["value"],
          v["verdict"]] for v in verdicts],
    ))
    if args.out is not None:
        args.out.write_text(json.dumps(verdicts, indent=1) + "\n")
    return 1 if any(v["verdict"] in ("missed", "missing") for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
