"""A comparison's ``--out`` folder as the record of finished trainings, so that a second call resumes the first.

``settings.json`` holds what every training of the comparison shares (data, model, epochs, learning rate, device
type, ...); ``runs/<recipe>_seed<seed>.json`` holds one finished training: its job and its result. A call with the
same shared settings reuses every finished training whose job is the same and whose saved state_dicts are still
there, and trains the rest: adding seeds or methods to a comparison trains only what is new. A call with other
shared settings stops with an error rather than mix two comparisons in one folder. An interrupted training starts
again from its first epoch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["RunStore", "SETTINGS_FILE"]

SETTINGS_FILE = "settings.json"
_MARK = "kdwrap compare"
# Job entries that say where or how fast a training ran, not what it computed: they may change between calls.
_VOLATILE = ("device", "threads", "save_as", "measure_memory")


def _comparable(job: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in job.items() if k not in _VOLATILE}))


class RunStore:
    """The finished trainings under ``out``."""

    def __init__(self, out: str | os.PathLike[str], shared: dict[str, Any]) -> None:
        self.out = Path(out)
        self.shared = json.loads(json.dumps(shared))  # as it reads back from the file (tuples become lists)
        self.runs = self.out / "runs"

    def open(self) -> None:
        """Claim ``out`` for these settings; ``ValueError`` naming the difference if it holds another comparison."""
        file = self.out / SETTINGS_FILE
        if file.is_file():
            try:
                held = json.loads(file.read_text())
            except ValueError:
                held = {}
            if held.get("written_by") != _MARK:
                raise ValueError(f"--out {self.out} holds a {SETTINGS_FILE} that kdwrap compare did not write; "
                                 "pass another --out")
            old = held.get("shared", {})
            # in the order the settings are listed (data and model first), so the error names the big ones
            keys = list(self.shared) + [k for k in old if k not in self.shared]
            changed = [k for k in keys if old.get(k) != self.shared.get(k)]
            if changed:
                what = "; ".join(f"{k}: {old.get(k)!r} there, {self.shared.get(k)!r} now" for k in changed[:3])
                what += f"; {len(changed) - 3} more" if len(changed) > 3 else ""
                raise ValueError(f"--out {self.out} holds another comparison ({what}); pass a new --out for these "
                                 f"settings, or delete {self.out} to start this one over")
        self.runs.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps({"written_by": _MARK, "shared": self.shared}, indent=1) + "\n")

    def _file(self, job: dict[str, Any]) -> Path:
        return self.runs / f"{job['recipe']}_seed{job['seed']}.json"

    def finished(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """The result of ``job`` if an earlier call finished it (same job, state_dicts present), else None."""
        file = self._file(job)
        if not file.is_file():
            return None
        try:
            held = json.loads(file.read_text())
        except ValueError:  # a file cut short by an interruption: train again
            return None
        if held.get("job") != _comparable(job):
            raise ValueError(
                f"--out {self.out} holds a {job['recipe']} training of seed {job['seed']} with other options "
                f"({file.name}); pass a new --out, or delete {file} to train it again with these")
        result = held["result"]
        files = [m.get("file") for m in result["models"].values()]
        return result if all(f and Path(f).is_file() for f in files) else None

    def save(self, job: dict[str, Any], result: dict[str, Any]) -> None:
        """Record a finished training (written whole, then renamed: an interruption leaves no half file)."""
        file = self._file(job)
        tmp = file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"job": _comparable(job), "result": result}) + "\n")
        os.replace(tmp, file)
