"""One source for each number: the figures the docs quote are recomputed from their JSON in benchmarks/results/.

Each rule names a page, an anchor on it (a table row's first cells, or words of a paragraph), the JSON file and how
the figure is computed from it. The test recomputes the figure with the code that printed it
(``benchmarks/accuracy_table.paired_to``, ``kdwrap.demo.seed_statistics``) and asserts that the row or paragraph the
anchor finds contains it, as printed. Two pages that quote the same measurement are tied to the same JSON, so they
cannot disagree; a figure whose JSON changes fails here until the page is updated.

Adding a figure to a page: add a rule here. Runs in well under a second (no training, only JSON reading).
"""
from __future__ import annotations

import functools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy_table import paired_to  # noqa: E402

from kdwrap.demo.seed_statistics import paired_difference, spread  # noqa: E402

# --- the JSON files -----------------------------------------------------------------------------------------------
FAMILY = "accuracy_osakd-cifar10-family-vs-controls_cpu_2026-12-07.json"  # every method + both controls, lr 0.003
CONTROLS = "accuracy_osakd-cifar10-controls-lr0.3x_cpu_2026-12-07.json"  # plain, label smoothing, weight average
PAPER = "accuracy_osakd-cifar10-paper-inbatch-and-label-smoothing_cpu_2026-12-07.json"  # OSAKD at 100 epochs
PAPER_INBATCH_LR = "accuracy_osakd-cifar10-paper-inbatch-alpha-reading-control_cpu_2026-12-07.json"
CIFAR_LR001 = "accuracy_osakd-cifar10_cpu_2026-12-02.json"  # lr 0.01, 3 seeds
CIFAR_ALPHA = "accuracy_osakd-cifar10_cpu_2026-12-03.json"  # lr 0.01 and 0.003, alpha sweep, 5 seeds
FMNIST = "accuracy_osakd-fmnist_cpu_2026-12-03.json"
R20_SUBSET = "accuracy_one-resnet20-subset_cpu_2026-12-02.json"
R20_FIT = "accuracy_one-resnet20-fit_cpu_2026-12-03.json"
DEMO = {day: f"demo_cifar10-pack_lenet5_cpu_2026-{day}.json" for day in ("12-03", "12-05", "12-07", "12-08")}
CPU_FAMILY = "speed_cpu_lenet5_family_2026-12-03.json"  # the CPU step cost of every method but PCL
CPU_PCL = "speed_cpu_lenet5_pcl-osakd_2026-12-07.json"  # PCL without views (as trained in the accuracy runs)
CPU_PCL_EXEC = "speed_cpu_lenet5_pcl-execution_2026-12-05.json"  # PCL sequential / fused, with views
CPU_FAMILY_PCL = "speed_cpu_lenet5_family_2026-12-04.json"  # PCL with views beside ONE, one run
CPU_OSAKD = "speed_cpu_lenet5_osakd_2026-12-03.json"  # OSAKD's bank sizes
H200_R32 = "speed_nvidia-h200_resnet32_2026-12-04.json"
H200_FAMILY = "speed_nvidia-h200_family_2026-12-04.json"

# Row labels of the accuracy JSONs.
ONE = "ONE m=3, 0.3x learning rate (branch 0)"
ONE_E = "ONE-E m=3, 0.3x learning rate"
OSAKD = "OSAKD 8-NN, 0.3x learning rate"
KD = "KD from cifar_resnet20, 0.3x learning rate"
DML = "DML 2 peers (peer 0), 0.3x learning rate"
OKDDIP = "OKDDip 3 peers + leader (leader), 0.3x learning rate"
BYOT = "BYOT (deepest exit), 0.3x learning rate"
PCL = "PCL 3 peers (temporal mean of peer 0), 0.3x learning rate"
LS = "plain, label smoothing 0.1, 0.3x learning rate"
EMA = "plain, weight average (deployed), 0.3x learning rate"
PLAIN = "plain, 0.3x learning rate"


# --- reading and computing ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def acc_row(name: str, reported: str) -> dict:
    rows = [r for r in load(name)["results"] if r["reported"] == reported]
    assert rows, f"{name} has no row {reported!r}"
    return rows[0]


def baseline_row(name: str) -> dict:
    rows = load(name)["results"]
    return next((r for r in rows if r.get("baseline")), None) or next(r for r in rows if r["variant"] == "plain")


def diff(name: str, reported: str, kind: str = "best", vs: str | None = None) -> str:
    """The paired difference of ``reported`` to ``vs`` (default: the file's baseline) over their common seeds, as
    the tables print it: ``+1.87 [+1.14, +2.61]``."""
    other = acc_row(name, vs) if vs else baseline_row(name)
    return paired_to(acc_row(name, reported), other, kind)["text"]


def diff_mean(name: str, reported: str, kind: str = "best", vs: str | None = None) -> str:
    """The mean of :func:`diff` alone: ``+1.87``."""
    return diff(name, reported, kind, vs).split(" ")[0]


def verdict(name: str, reported: str, kind: str = "best", vs: str | None = None) -> str:
    other = acc_row(name, vs) if vs else baseline_row(name)
    return paired_to(acc_row(name, reported), other, kind)["verdict"]


def mean_std(name: str, reported: str, kind: str = "best") -> str:
    return str(spread(acc_row(name, reported)[kind]))


def stronger_control(name: str, kind: str = "best") -> str:
    """The label of the control with the higher mean (weight averaging on the family's protocol)."""
    controls = [acc_row(name, c) for c in (LS, EMA)]
    return max(controls, key=lambda r: spread(r[kind]).mean)["reported"]


def vs_control(name: str, reported: str, kind: str = "best") -> str:
    return diff(name, reported, kind, vs=stronger_control(name, kind))


def demo_diff(name: str, method: str) -> str:
    rows = {r["method"]: r["accuracies"] for r in load(name)["rows"]}
    return str(paired_difference(rows[method], rows["plain"]))


def demo_mean(name: str, method: str) -> str:
    return demo_diff(name, method).split(" ")[0]


def speed_row(name: str, variant: str) -> dict:
    rows = [r for r in load(name)["results"] if r["variant"] == variant]
    assert rows, f"{name} has no variant {variant!r}"
    return rows[0]


def step(name: str, variant: str, key: str = "ratio", digits: int = 2) -> str:
    """A training step's time relative to plain's in the same run: median (``ratio``) or fastest (``ratio_min``)."""
    return f"{speed_row(name, variant)[key]:.{digits}f}"


def peak(name: str, variant: str) -> str:
    """Peak GPU memory relative to plain's in the same run."""
    return f"{speed_row(name, variant)['peak_gib'] / speed_row(name, 'plain')['peak_gib']:.2f}"


# --- the rules ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    page: str
    anchor: str  # "| first cells |" finds a table row; other text finds the paragraph (or list item) holding it
    figures: tuple[Callable[[], str], ...]


def r(page: str, anchor: str, *figures: Callable[[], str]) -> Rule:
    return Rule(page, anchor, figures)


def f(fn: Callable[..., str], *args, **kwargs) -> Callable[[], str]:
    g = functools.partial(fn, *args, **kwargs)
    g.__name__ = f"{fn.__name__}{args}{kwargs or ''}"  # type: ignore[attr-defined]
    return g


def cost_row(name: str, cpu: str, gpu: str | None) -> tuple[Callable[[], str], ...]:
    """The README's cost cells: CPU step / H200 step, H200 peak memory."""
    if gpu is None:
        return (f(step, CPU_FAMILY, cpu),)
    gpu_file = H200_R32 if gpu.startswith(("ONE", "OSAKD")) else H200_FAMILY
    return (lambda: f"{step(CPU_FAMILY, cpu)} / {step(gpu_file, gpu)}", f(peak, gpu_file, gpu))


def method_cells(reported: str) -> tuple[Callable[[], str], ...]:
    return (f(diff, FAMILY, reported), f(vs_control, FAMILY, reported))


README_TABLE = [
    r("README.md", "| ONE, 3 branches |", *cost_row("ONE", "ONE m=3 sequential", "ONE m=3 auto"), *method_cells(ONE)),
    r("README.md", "| ONE-E (", *method_cells(ONE_E)),
    r("README.md", "| OKDDip, 4 branches |", *cost_row("", "OKDDip m=4", "OKDDip m=4"), *method_cells(OKDDIP)),
    r("README.md", "| PCL, 3 peers, no views |", *method_cells(PCL), f(vs_control, FAMILY, PCL, "last"),
      # the CPU cell is the median step, as in every row (the note below the table gives the fastest step too)
      f(step, CPU_PCL, "PCL m=3 no views sequential")),
    r("README.md", "| DML, 2 peers |", *cost_row("", "DML 2 peers", "DML 2 peers"), *method_cells(DML)),
    r("README.md", "| KD from a bigger teacher |", *cost_row("", "KD same-model teacher", "KD same-model teacher"),
      *method_cells(KD)),
    r("README.md", "| OSAKD (defaults) |", *cost_row("", "OSAKD bank 16,384", "OSAKD bank 16,384"),
      *method_cells(OSAKD)),
    r("README.md", "| BYOT |", *cost_row("", "BYOT", "BYOT"), *method_cells(BYOT)),
    r("README.md", "On this protocol (20 epochs, lr 0.003) the weight", f(diff, CONTROLS, EMA), f(diff, CONTROLS, LS)),
    r("README.md", "Setup of the accuracy columns",
      f(step, CPU_PCL, "PCL m=3 no views sequential"), f(step, CPU_PCL, "PCL m=3 no views sequential", "ratio_min")),
    r("README.md", "OSAKD did not beat plain or label smoothing at its paper's protocol",
      f(diff, PAPER, "OSAKD 8-NN"), f(diff, PAPER, "OSAKD 8-NN", vs="plain, label smoothing 0.1"),
      f(diff, PAPER, "plain, label smoothing 0.1"), f(diff, PAPER, "OSAKD 8-NN in-batch alpha 0.1"),
      f(diff, PAPER_INBATCH_LR, "OSAKD 8-NN in-batch alpha 0.1", vs="plain, 0.1x learning rate")),
    r("README.md", "ONE's deployed branch on Fashion-MNIST",
      f(diff, FMNIST, "ONE m=2 (branch 0)"), f(diff, FMNIST, "ONE m=3 (branch 0)"),
      f(diff, R20_SUBSET, "ONE m=3 (branch 0)", "last"), f(diff, R20_FIT, "ONE m=3 (branch 0)", "last")),
    # the demo's trainings on an idle machine (the JSON's wall time), in minutes
    r("README.md", "The first command installs kdwrap and runs the offline demo",
      lambda: f"about {round(load(DEMO['12-03'])['wall_seconds'] / 60)} minutes"),
    r("README.md", "The demo's table depends on the machine",
      *(f(demo_mean, DEMO[day], m) for day in DEMO for m in ("ONE", "ONE-E", "OSAKD"))),
]

# docs/results.md: the controls' table, every method against them, and the summary rows tied to those JSON.
RESULTS_TABLES = [
    r("docs/results.md", "| plain, label smoothing 0.1 |", f(mean_std, CONTROLS, LS), f(diff, CONTROLS, LS),
      f(mean_std, CONTROLS, LS, "last"), f(diff, CONTROLS, LS, "last")),
    r("docs/results.md", "| plain, weight average (deployed) |", f(mean_std, CONTROLS, EMA), f(diff, CONTROLS, EMA),
      f(mean_std, CONTROLS, EMA, "last"), f(diff, CONTROLS, EMA, "last")),
    r("docs/results.md", "| plain | 64.11 ± 0.84 | (baseline) |", f(mean_std, CONTROLS, PLAIN),
      f(mean_std, CONTROLS, PLAIN, "last")),
    *(r("docs/results.md", anchor, f(diff_mean, FAMILY, label), f(vs_control, FAMILY, label),
        f(verdict, FAMILY, label, vs=EMA), f(diff_mean, FAMILY, label, "last"), f(vs_control, FAMILY, label, "last"))
      for anchor, label in [("| ONE m=3 (branch 0) | 0-4 |", ONE), ("| ONE-E m=3 (not", ONE_E),
                            ("| OKDDip m=4 (the leader) | 0-2 |", OKDDIP),
                            ("| PCL m=3 (temporal mean of peer 0; no views) |", PCL),
                            ("| DML 2 peers (peer 0) | 0-4 |", DML), ("| KD from a CIFAR ResNet-20 | 0-2 |", KD),
                            ("| OSAKD 8-NN (alpha 0.9) | 0-4 |", OSAKD),
                            ("| BYOT (the network's own head) | 0-2 | -0.24 |", BYOT)]),
    r("docs/results.md", "| The methods beat the free controls |", f(diff, CONTROLS, EMA),
      *(f(vs_control, FAMILY, x) for x in (ONE, OKDDIP, PCL, DML, ONE_E)), f(vs_control, FAMILY, PCL, "last")),
    r("docs/results.md", "| OKDDip's leader beats plain |", f(diff, FAMILY, OKDDIP), f(diff, FAMILY, OKDDIP, "last")),
    r("docs/results.md", "| KD (from a CIFAR ResNet-20) and BYOT beat plain |", f(diff, FAMILY, KD),
      f(diff, FAMILY, BYOT)),
    r("docs/results.md", "| PCL's deployed temporal mean beats plain |", f(diff, FAMILY, PCL),
      f(diff, FAMILY, PCL, "last"), f(diff, FAMILY, PCL, vs=ONE)),
    r("docs/results.md", "| DML's deployed peer beats plain |", f(diff, FAMILY, DML), f(diff, FAMILY, DML, "last")),
    r("docs/results.md", "| ONE-E beats plain |", f(diff, FAMILY, ONE_E), f(diff, CIFAR_LR001, "ONE-E m=3"),
      f(diff, FMNIST, "ONE-E m=3"), *(f(demo_diff, DEMO[day], "ONE-E") for day in DEMO)),
    r("docs/results.md", "| ONE's deployed branch beats plain |", f(diff, FAMILY, ONE), f(diff, FAMILY, ONE, "last"),
      f(diff, FMNIST, "ONE m=2 (branch 0)"), f(diff, CIFAR_LR001, "ONE m=3 (branch 0)"),
      f(diff, FMNIST, "ONE m=3 (branch 0)"), f(diff, FMNIST, "ONE m=2 (branch 0)", "last"),
      f(diff, FMNIST, "ONE m=3 (branch 0)", "last"), *(f(demo_diff, DEMO[day], "ONE") for day in DEMO)),
    r("docs/results.md", "| OSAKD beats plain |", f(diff, PAPER, "OSAKD 8-NN"), f(diff, PAPER, "OSAKD 16-NN"),
      f(diff, PAPER, "OSAKD 8-NN, bank of one epoch"), f(diff, CIFAR_ALPHA, "OSAKD 8-NN"),
      f(diff, CIFAR_ALPHA, "OSAKD 8-NN alpha 0.3"), f(diff, CIFAR_ALPHA, PLAIN), f(diff, FAMILY, OSAKD),
      f(diff, FMNIST, "OSAKD 8-NN"), *(f(demo_diff, DEMO[day], "OSAKD") for day in DEMO)),
    r("docs/results.md", "| ONE on a residual network (ResNet-20) |", f(diff, R20_SUBSET, "ONE m=3 (branch 0)", "last"),
      f(diff, R20_SUBSET, "ONE-E m=3", "last"), f(diff, R20_FIT, "ONE m=3 (branch 0)", "last"),
      f(diff, R20_FIT, "ONE-E m=3", "last")),
]

# docs/methods.md's table of the family on one protocol: accuracy from the family JSON, cost from the CPU run.
METHODS_TABLE = [
    r("docs/methods.md", anchor, f(mean_std, FAMILY, label), f(diff, FAMILY, label), f(verdict, FAMILY, label),
      f(diff, FAMILY, label, "last"), f(vs_control, FAMILY, label), *((f(step, CPU_FAMILY, cpu),) if cpu else ()))
    for anchor, label, cpu in [
        ("| ONE m=3 (branch 0) | 0-4 |", ONE, "ONE m=3 sequential"),
        ("| OSAKD 8-NN (alpha 0.9) | 0-4 |", OSAKD, "OSAKD bank 16,384"),
        ("| KD from a CIFAR ResNet-20 (", KD, "KD same-model teacher"),
        ("| DML 2 peers (peer 0) | 0-4 |", DML, "DML 2 peers"),
        ("| OKDDip m=4 (the leader) | 0-2 |", OKDDIP, "OKDDip m=4"),
        ("| BYOT (the network's own head) | 0-2 |", BYOT, "BYOT"),
        ("| PCL m=3 (temporal mean of peer 0) | 0-2 |", PCL, None),
    ]
]

# The method pages: their Cost and Measured gains sections quote the same runs as the README's table.
def gpu(variant: str) -> tuple[Callable[[], str], ...]:
    name = H200_R32 if variant.startswith(("ONE", "OSAKD")) else H200_FAMILY
    return (f(step, name, variant), f(peak, name, variant))


METHOD_PAGES = [
    r("docs/one.md", "3 branches, the training step against plain's", f(step, CPU_FAMILY, "ONE m=3 sequential"),
      *gpu("ONE m=3 auto"), f(step, "speed_nvidia-h200_resnet50_2026-12-04.json", "ONE m=3 auto")),
    r("docs/one.md", "Against the stronger free control, weight averaging", f(vs_control, FAMILY, ONE),
      f(vs_control, FAMILY, ONE_E)),
    r("docs/one.md", "The reference code reports branch 0's best", f(diff, FAMILY, ONE), f(diff, FAMILY, ONE, "last"),
      f(diff, FAMILY, ONE_E), f(diff, FAMILY, ONE_E, "last"), f(diff, R20_FIT, "ONE m=3 (branch 0)", "last")),
    r("docs/osakd.md", "OSAKD with its defaults is", f(diff, FAMILY, OSAKD), f(vs_control, FAMILY, OSAKD)),
    r("docs/osakd.md", "**kdwrap does not reproduce the paper's gain**", f(diff, PAPER, "OSAKD 8-NN"),
      f(diff, PAPER, "plain, label smoothing 0.1"), f(diff, PAPER, "OSAKD 8-NN", vs="plain, label smoothing 0.1"),
      f(diff, PAPER, "OSAKD 8-NN in-batch alpha 0.1"),
      f(diff, PAPER_INBATCH_LR, "OSAKD 8-NN in-batch alpha 0.1", vs="plain, 0.1x learning rate")),
    r("docs/osakd.md", "On the GPU (H200, 2026-12-04", f(step, H200_R32, "OSAKD bank 16,384"),
      f(step, "speed_nvidia-h200_resnet50_2026-12-04.json", "OSAKD bank 16,384")),
    *(r("docs/osakd.md", f"| {label} |", lambda v=variant: f"{step(CPU_OSAKD, v)}x")
      for label, variant in [("in-batch (`bank_size=0`)", "OSAKD in-batch"), ("bank 4,096", "OSAKD bank 4,096"),
                             ("bank 16,384 (default)", "OSAKD bank 16,384"), ("bank 65,536", "OSAKD bank 65,536")]),
    r("docs/osakd.md", "This run times OSAKD's settings", f(step, CPU_FAMILY, "OSAKD bank 16,384")),
    r("docs/kd.md", "One teacher forward (no backward)", f(step, CPU_FAMILY, "KD same-model teacher")),
    r("docs/kd.md", "On an H200", *gpu("KD same-model teacher")),
    r("docs/kd.md", "distilled from a plain CIFAR ResNet-20", f(diff, FAMILY, KD), f(diff, FAMILY, KD, "last")),
    r("docs/kd.md", "Against weight averaging", f(vs_control, FAMILY, KD)),
    r("docs/dml.md", "forwards and backwards per training step", f(step, CPU_FAMILY, "DML 2 peers")),
    r("docs/dml.md", "On an H200", *gpu("DML 2 peers")),
    r("docs/dml.md", "the OSAKD paper's LeNet-5 on CIFAR-10 (the shipped pack)", f(diff, FAMILY, DML),
      f(diff, FAMILY, DML, "last"), f(mean_std, FAMILY, DML),
      f(mean_std, FAMILY, PLAIN)),
    r("docs/dml.md", "Against weight averaging", f(vs_control, FAMILY, DML)),
    r("docs/okddip.md", "branches of LeNet-5", f(step, CPU_FAMILY, "OKDDip m=4"),
      f(step, CPU_FAMILY, "ONE m=3 sequential"), *gpu("OKDDip m=4")),
    r("docs/okddip.md", "the leader gains", f(diff, FAMILY, OKDDIP), f(diff, FAMILY, OKDDIP, "last"),
      f(vs_control, FAMILY, OKDDIP)),
    r("docs/byot.md", "the plain step on LeNet-5", f(step, CPU_FAMILY, "BYOT"), *gpu("BYOT")),
    r("docs/byot.md", "points against plain at the best epoch", f(diff, FAMILY, BYOT), f(diff, FAMILY, BYOT, "last"),
      f(vs_control, FAMILY, BYOT)),
    r("docs/pcl.md", "Measured on LeNet-5 (batch 64, one CPU thread)", f(step, CPU_PCL_EXEC, "PCL m=3 sequential"),
      f(step, CPU_PCL_EXEC, "PCL m=3 fused"), f(step, CPU_PCL, "PCL m=3 no views sequential"),
      f(step, CPU_PCL, "PCL m=3 no views sequential", "ratio_min")),
    r("docs/pcl.md", "3 peers without views (the protocol does not augment)", f(diff, FAMILY, PCL),
      f(diff, FAMILY, PCL, "last"), f(vs_control, FAMILY, PCL), f(vs_control, FAMILY, PCL, "last")),
    r("docs/methods.md", "**PCL** (`kdwrap.pcl`)", f(vs_control, FAMILY, PCL), f(vs_control, FAMILY, PCL, "last"),
      f(step, CPU_PCL_EXEC, "PCL m=3 sequential"),
      lambda: step(CPU_PCL, "PCL m=3 no views sequential", "ratio_min", 1)),
    r("docs/methods.md", "**Default for a timm CNN", *gpu("ONE m=3 auto"), f(vs_control, FAMILY, ONE_E),
      f(vs_control, FAMILY, ONE)),
    r("docs/methods.md", "**OKDDip** (`kdwrap.okddip`)", f(diff, FAMILY, OKDDIP), f(vs_control, FAMILY, OKDDIP),
      f(step, H200_FAMILY, "OKDDip m=4")),
]

RULES = README_TABLE + RESULTS_TABLES + METHODS_TABLE + METHOD_PAGES


def locate(page: str, anchor: str) -> str:
    """The table row that starts with ``anchor``, or the paragraph / list item that contains it (lines joined)."""
    text = (ROOT / page).read_text()
    if anchor.startswith("|"):
        rows = [line for line in text.splitlines() if line.startswith(anchor)]
        assert len(rows) == 1, f"{page}: {len(rows)} table rows start with {anchor!r}"
        return rows[0]
    blocks = re.split(r"\n\s*\n|\n(?=- )", text)
    found = [" ".join(line.strip() for line in b.splitlines()) for b in blocks if anchor in " ".join(
        line.strip() for line in b.splitlines())]
    assert len(found) == 1, f"{page}: {len(found)} paragraphs contain {anchor!r}"
    return found[0]


@pytest.mark.parametrize("rule", RULES, ids=lambda x: f"{x.page}:{x.anchor[:40]}")
def test_quoted_figure_equals_its_json(rule: Rule) -> None:
    where = locate(rule.page, rule.anchor)
    for figure in rule.figures:
        value = figure()
        assert value in where, (f"{rule.page}, at {rule.anchor!r}: the JSON gives {value} "
                                f"({getattr(figure, '__name__', 'figure')}), not found in:\n{where}")


# --- one figure per cost ------------------------------------------------------------------------------------------
# A method's CPU step cost on LeNet-5 was measured in several runs; the user pages quote one of them (the run of the
# family table, CPU_FAMILY; PCL's with views: CPU_PCL_EXEC), results.md gives the others as other runs. A figure of
# another run on a user page is a second number for the same cost.
COST_RUNS = {  # variant: (the quoted run, the other runs of the same variant)
    "ONE m=3 sequential": (CPU_FAMILY, [CPU_FAMILY_PCL, CPU_PCL_EXEC]),
    "OSAKD bank 16,384": (CPU_FAMILY, [CPU_FAMILY_PCL, CPU_OSAKD]),
    "DML 2 peers": (CPU_FAMILY, [CPU_FAMILY_PCL]),
    "OKDDip m=4": (CPU_FAMILY, [CPU_FAMILY_PCL]),
    "BYOT": (CPU_FAMILY, [CPU_FAMILY_PCL]),
    "KD same-model teacher": (CPU_FAMILY, [CPU_FAMILY_PCL]),
    "PCL m=3 sequential": (CPU_PCL_EXEC, [CPU_PCL]),
}
USER_PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md")
                                           if p.name not in ("results.md", "api.md") and "api" not in p.parts)]


@pytest.mark.parametrize("variant", list(COST_RUNS))
def test_a_cost_is_quoted_from_one_run(variant: str) -> None:
    quoted, others = COST_RUNS[variant]
    mine = step(quoted, variant)
    for other in others:
        theirs = step(other, variant)
        if theirs == mine:
            continue
        for page in USER_PAGES:
            text = " ".join(page.read_text().split())
            name = variant.split()[0]
            for m in re.finditer(rf"\b{re.escape(theirs)}x", text):
                window = text[max(0, m.start() - 160):m.end() + 40]
                assert name not in window, (
                    f"{page.relative_to(ROOT)} quotes {name}'s CPU step as {theirs}x ({other}); the user pages "
                    f"quote {mine}x ({quoted}): give one figure, or send the other run to results.md")


# --- the options table (docs/options.md) ----------------------------------------------------------------------------
METHOD_NAMES = {"one": "ONE", "osakd": "OSAKD", "kd": "KD", "dml": "DML", "okddip": "OKDDip", "byot": "BYOT",
                "pcl": "PCL"}


def signature_options() -> dict[str, dict[str, str]]:
    """option -> {method's display name: default as the table prints it}, from the wrappers' signatures (their
    arguments after the network) and the keyword-only parameters of the classes the options are routed to."""
    import inspect

    import kdwrap
    from kdwrap.base import option_names
    from kdwrap.methods import byot, dml, kd, okddip, one, osakd, pcl

    owners = {"one": (one.ONEModel, one.ONELoss), "osakd": (osakd.OSAKDModel, osakd.OSAKDLoss),
              "kd": (kd.HintonKDModel, kd.HintonKDLoss), "dml": (dml.DMLModel, dml.DMLLoss),
              "okddip": (okddip.OKDDipModel, okddip.OKDDipLoss), "byot": (byot.BYOTModel, byot.BYOTLoss),
              "pcl": (pcl.PCLModel, pcl.PCLLoss)}
    found: dict[str, dict[str, str]] = {}

    def add(option: str, method: str, default: object) -> None:
        shown = "required" if default is inspect.Parameter.empty else f"`{default!r}`"
        found.setdefault(option, {}).setdefault(METHOD_NAMES[method], shown)

    for method, classes in owners.items():
        params = list(inspect.signature(getattr(kdwrap, method)).parameters.values())[1:]
        for p in params:
            if p.kind is not p.VAR_KEYWORD:
                add(p.name, method, None if p.name == "teacher" else p.default)  # kd's teacher: required in effect
        for cls in classes:
            sig = inspect.signature(cls)
            for name in option_names(cls):
                add(name, method, sig.parameters[name].default)
    found["teacher"] = {"KD": "required"}
    return found


def options_table() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in (ROOT / "docs" / "options.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4:
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def test_options_table_lists_every_option_with_its_methods_and_default() -> None:
    expected, table = signature_options(), options_table()
    assert sorted(table) == sorted(expected), (
        f"docs/options.md: missing {sorted(set(expected) - set(table))}, "
        f"not an option {sorted(set(table) - set(expected))}")
    for option, by_method in expected.items():
        default_cell, methods_cell = table[option]
        methods = (set(METHOD_NAMES.values()) if methods_cell == "all seven"
                   else {m.strip() for m in methods_cell.split(",")})
        assert methods == set(by_method), (
            f"`{option}`: the table says {methods_cell!r}, the signatures {sorted(by_method)}")
        defaults = set(by_method.values())
        if len(defaults) == 1:
            assert default_cell == defaults.pop(), f"`{option}`: default {default_cell!r}, signatures {by_method}"
        else:
            want = " · ".join(f"{m} {d}" for m, d in by_method.items())
            assert default_cell == want, f"`{option}`: default {default_cell!r}, signatures: {want!r}"


# --- docs/troubleshooting.md quotes kdwrap's messages as they are ----------------------------------------------------
def kdwrap_source() -> str:
    """kdwrap's code with implicitly concatenated string literals joined, so a message split over lines reads whole."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "kdwrap").rglob("*.py")))
    return re.sub(r"[\"']\s*\n\s*(?:#[^\n]*\n\s*)*[fr]?[\"']", "", text)


def test_troubleshooting_quotes_messages_kdwrap_raises() -> None:
    source = kdwrap_source()
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    quoted = [cell for row in page.splitlines() if row.startswith("| `") or row.startswith("| warning: `")
              for cell in re.findall(r"`([^`]+)`", row.split("|")[1])]
    assert len(quoted) > 60
    missing = []
    for message in quoted:
        for piece in message.split("…"):
            piece = piece.strip(" .,;:")
            if len(piece) >= 4 and piece not in source:
                missing.append((message, piece))
    assert not missing, "docs/troubleshooting.md quotes messages kdwrap no longer has:\n" + "\n".join(
        f"  {m!r}: {p!r}" for m, p in missing)
