"""Generate kdwrap's API reference from the docstrings: docs/api.md (the index) and one page per section in docs/api/.

    python docs/gen_api.py           # rewrite docs/api.md and docs/api/*.md
    python docs/gen_api.py --check   # exit 1 if any of them is not what the docstrings give (for CI)

The docstrings are the source of truth: edit them, then run this script. Sphinx-style roles (:func:`x`) and
double backticks become Markdown code; Google-style ``Args:`` sections become lists.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = Path(__file__).resolve().parent / "api.md"
PAGES_DIR = Path(__file__).resolve().parent / "api"
WIDTH = 118  # prose lines wrap here (tables and code blocks do not)

# (section title, intro, [dotted names]); a module name stands for everything in its __all__.
SECTIONS: list[tuple[str, str, list[str]]] = [
    ("Entry points", "Wrap a model, export the deployable model, describe a wrapper. Usage is always "
     "`model, loss_fn = kdwrap.one(net)` (or `osakd`, `kd`, `dml`, `okddip`, `byot`, `pcl`, `wrap`), then "
     "`loss = loss_fn(model(x), y)`.",
     ["kdwrap.wrap", "kdwrap.one", "kdwrap.osakd", "kdwrap.kd", "kdwrap.dml", "kdwrap.okddip", "kdwrap.byot",
      "kdwrap.pcl", "kdwrap.export", "kdwrap.summary",
      "kdwrap.METHODS", "kdwrap.register_method"]),
    ("Errors", "Raised on purpose, with a message that names the problem and the fix; all importable from `kdwrap`.",
     ["kdwrap.errors"]),
    ("Base classes", "What every method's model and loss share.", ["kdwrap.KDModel", "kdwrap.KDLoss"]),
    ("ONE", "On-the-fly Native Ensemble; see [one.md](one.md).",
     ["kdwrap.methods.one.build_one", "kdwrap.methods.one.ONEModel", "kdwrap.methods.one.ONELoss",
      "kdwrap.methods.one.ONEEnsemble", "kdwrap.methods.one.ONEGate", "kdwrap.methods.losses.ramp_weight",
      "kdwrap.methods.losses.RampedLoss",
      "kdwrap.methods.branched.BranchedModel", "kdwrap.methods.branch_init.reinitialise_like"]),
    ("Fused branches (`kdwrap.fused`)", "ONE's branches as one graph; see [one.md](one.md#how-the-branches-run).",
     ["kdwrap.fused.fuse_branches", "kdwrap.fused.FusedBranches", "kdwrap.fused.register_module_rule",
      "kdwrap.fused.ModuleRule", "kdwrap.fused.planner.EXECUTIONS", "kdwrap.fused.planner.FUSE_MAX_GFLOP"]),
    ("OSAKD", "Online Self-Acquired Knowledge Distillation; see [osakd.md](osakd.md).",
     ["kdwrap.methods.osakd.build_osakd", "kdwrap.methods.osakd.OSAKDModel", "kdwrap.methods.osakd.OSAKDLoss",
      "kdwrap.methods.osakd.soft_label_diagnostics", "kdwrap.methods.osakd.distill_gradient_ratio",
      "kdwrap.memory_bank.MemoryBank", "kdwrap.knn.knn_soft_labels", "kdwrap.knn.knn_search"]),
    ("KD", "Knowledge distillation from a frozen teacher; see [kd.md](kd.md).",
     ["kdwrap.methods.kd.build_kd", "kdwrap.methods.kd.HintonKDModel", "kdwrap.methods.kd.HintonKDLoss",
      "kdwrap.methods.losses.softened_kl"]),
    ("DML", "Deep Mutual Learning; see [dml.md](dml.md).",
     ["kdwrap.methods.dml.build_dml", "kdwrap.methods.dml.DMLModel", "kdwrap.methods.dml.DMLLoss"]),
    ("OKDDip", "Online KD with Diverse Peers; see [okddip.md](okddip.md).",
     ["kdwrap.methods.okddip.build_okddip", "kdwrap.methods.okddip.OKDDipModel", "kdwrap.methods.okddip.OKDDipLoss",
      "kdwrap.methods.okddip.PeerAttention"]),
    ("BYOT", "Be Your Own Teacher; see [byot.md](byot.md).",
     ["kdwrap.methods.byot.build_byot", "kdwrap.methods.byot.BYOTModel", "kdwrap.methods.byot.BYOTLoss",
      "kdwrap.methods.byot.MultiExit", "kdwrap.methods.byot.EXIT_HEADS"]),
    ("PCL", "Peer Collaborative Learning; see [pcl.md](pcl.md).",
     ["kdwrap.methods.pcl.build_pcl", "kdwrap.methods.pcl.PCLModel", "kdwrap.methods.pcl.PCLLoss",
      "kdwrap.augment.random_crop_flip", "kdwrap.methods.temporal_mean.mean_copy"]),
    ("timm's task API (`kdwrap.integrations.timm`)", "A `timm.task` training task for every method, a drop-in for "
     "timm's `ClassificationTask`, and what the patch for timm's own train.py calls "
     "(`kdwrap.integrations.timm_train`); see [integrations.md](integrations.md#timms-task-api).",
     ["kdwrap.integrations.timm.KDTask", "kdwrap.integrations.timm_train"]),
    ("Models (`kdwrap.models`)", "Reference classifiers; importing the module registers them with timm.",
     ["kdwrap.models"]),
    ("Data (`kdwrap.demo.data`)", "Offline datasets as in-memory tensors, and tensor helpers for training on the device.",
     ["kdwrap.demo.data"]),
    ("The free controls (`kdwrap.controls`)", "Label smoothing and a weight average: what every gain is compared "
     "with; see [results.md](results.md).", ["kdwrap.controls"]),
    ("Comparing methods on your data (`kdwrap.demo.compare`)", "`python -m kdwrap compare`; see "
     "[compare.md](compare.md).", ["kdwrap.demo.compare.run_compare"]),
    ("Comparing over seeds (`kdwrap.demo.seed_statistics`)", "The statistics the demo and `benchmarks/accuracy.py` "
     "report; see [results.md](results.md).", ["kdwrap.demo.seed_statistics"]),
    ("Internals: reading and cutting a model (`kdwrap.graph`)", "Not part of the public surface: these may change "
     "between versions. The entry points ONE, OKDDip and BYOT use to trace, cut and read a model; see "
     "[one.md](one.md#choosing-the-split).",
     ["kdwrap.graph.split_model", "kdwrap.graph.auto_split", "kdwrap.graph.SplitResult", "kdwrap.graph.SplitChoice",
      "kdwrap.graph.candidates", "kdwrap.graph.Candidate", "kdwrap.graph.stage_starts", "kdwrap.graph.trace"]),
]

_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|obj|exc):`~?([^`]+)`")
_SECTION = re.compile(r"^(Args|Arguments|Returns|Raises|Yields|Attributes|Example|Examples|Note|Notes):\s*$")


def resolve(name: str) -> Any:
    """Import ``a.b.c``: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def markdown(doc: str | None) -> str:
    """A docstring as Markdown: roles and ``code`` to `code`; Args-style sections to bullet lists."""
    if not doc:
        return "*(no docstring)*"
    doc = _ROLE.sub(r"`\1`", doc).replace("``", "`")
    out: list[str] = []
    in_section = False
    for line in doc.splitlines():
        m = _SECTION.match(line)
        if m:
            out += ["", f"**{m.group(1)}:**", ""]
            in_section = True
            continue
        if in_section:
            if not line.strip():
                in_section = False
                out.append("")
                continue
            item = re.match(r"^ {4}(\S[^:]*?):\s+(.*)$", line)
            if item and not line.startswith(" " * 8):
                out.append(f"- `{item.group(1)}`: {item.group(2)}")
            else:
                out[-1] += " " + line.strip()  # continuation of the item above
            continue
        out.append(line)
    return "\n".join(out).strip()


class _Raw:
    """Renders as its text: annotations kept as strings (``from __future__ import annotations``) lose their quotes."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _annotation(a: Any) -> Any:
    if isinstance(a, str):
        return _Raw(a)
    if hasattr(a, "__forward_arg__"):  # typing.ForwardRef
        return _Raw(a.__forward_arg__)
    return a


def value_repr(value: Any) -> str:
    """repr without memory addresses, so the generated file is the same on every run."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {value_repr(v)}" for k, v in value.items()) + "}"
    return repr(value)


def signature(name: str, obj: Any) -> str:
    """``name(params) -> ret``, one parameter a line when it would not fit in 100 characters."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    if inspect.isclass(obj):  # __init__'s "-> None", kept as a string annotation, is no part of a class's signature
        sig = sig.replace(return_annotation=inspect.Signature.empty)
    params = [p.replace(annotation=_annotation(p.annotation)) for p in sig.parameters.values()]
    sig = sig.replace(parameters=params, return_annotation=_annotation(sig.return_annotation))
    text = f"{name}{sig}"
    if len(text) <= 100:
        return text
    ret = "" if sig.return_annotation is inspect.Signature.empty else f" -> {sig.return_annotation!r}"
    body = "".join(f"    {p},\n" for p in sig.replace(return_annotation=inspect.Signature.empty).parameters.values())
    # str(Parameter) drops the '/' and '*' markers; re-insert a bare '*' before the first keyword-only parameter.
    kinds = [p.kind for p in params]
    if inspect.Parameter.KEYWORD_ONLY in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds:
        lines = body.splitlines(keepends=True)
        lines.insert(kinds.index(inspect.Parameter.KEYWORD_ONLY), "    *,\n")
        body = "".join(lines)
    return f"{name}(\n{body}){ret}"


def render_function(name: str, obj: Any, level: int = 3) -> list[str]:
    return [f"{'#' * level} `{name}`", "", "```python", signature(name, obj), "```", "", markdown(inspect.getdoc(obj)),
            ""]


def own_methods(cls: type) -> list[tuple[str, Any]]:
    """Public methods and properties defined by ``cls`` itself (not inherited from torch's nn.Module)."""
    items = []
    for attr, value in cls.__dict__.items():
        if attr.startswith("_") or attr in ("extra_repr", "get_extra_state", "set_extra_state"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            items.append((attr, value))
    return items


def render_class(name: str, cls: type) -> list[str]:
    bases = ", ".join(b.__name__ if b.__module__ == "builtins" else
                      re.sub(r"^torch\.nn\.modules\.\w+\.", "torch.nn.", f"{b.__module__}.{b.__qualname__}")
                      for b in cls.__bases__)
    lines = [f"### class `{name}`", "", "```python", f"class {signature(name.rsplit('.', 1)[-1], cls)}",
             "```", "", f"Bases: `{bases}`", "", markdown(inspect.getdoc(cls)), ""]
    for attr, value in own_methods(cls):
        if isinstance(value, property):
            lines += [f"#### property `{attr}`", "", markdown(inspect.getdoc(value)), ""]
        else:
            lines += [f"#### `{attr}`", "", "```python", signature(attr, value), "```", "",
                      markdown(inspect.getdoc(value)), ""]
    return lines


def render(name: str) -> list[str]:
    obj = resolve(name)
    if inspect.ismodule(obj):
        lines = []
        for member in getattr(obj, "__all__", []):
            value = getattr(obj, member)
            if inspect.isclass(value) or inspect.isfunction(value):
                lines += render(f"{name}.{member}")
            else:  # a constant: show its value
                lines += [f"### `{name}.{member}`", "", f"`{value_repr(value)}`", ""]
        return lines
    if inspect.isclass(obj):
        return render_class(name, obj)
    if callable(obj):
        return render_function(name, obj)
    return [f"### `{name}`", "", f"`{value_repr(obj)}`", ""]


def slug(title: str) -> str:
    """A section's page name: ``Fused branches (`kdwrap.fused`)`` -> ``fused-branches``."""
    title = title.split(" (")[0].replace("'", "").replace(":", "")
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", title.lower())).strip("-")


def wrap_prose(text: str) -> str:
    """Wrap prose lines longer than 120 characters at WIDTH (bullets with a hanging indent); headings, tables and
    code blocks stay as they are."""
    out, fence = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fence = not fence
        if fence or len(line) <= 120 or line.startswith(("|", "#", "    ")) or line.lstrip().startswith("```"):
            out.append(line)
            continue
        bullet = re.match(r"^(\s*(?:[-*]|\d+\.)\s+)", line)
        first = bullet.group(1) if bullet else ""
        out += textwrap.wrap(line[len(first):], WIDTH, initial_indent=first, subsequent_indent=" " * len(first),
                             break_long_words=False, break_on_hyphens=False)
    return "\n".join(out)


def section_page(title: str, intro: str, names: list[str]) -> str:
    """One section of the reference as its own page, in docs/api/: its links point one folder up."""
    lines = [f"# {title}", "", "[API reference](../api.md) · generated by `python docs/gen_api.py` from the "
             "docstrings: edit those, not this file.", "", re.sub(r"\]\((?![a-z]+:|#)", "](../", intro), ""]
    for name in names:
        try:
            lines += [re.sub(r"^### ", "## ", re.sub(r"^#### ", "### ", x)) for x in render(name)]
        except (ImportError, AttributeError) as err:  # a part another engineer has not finished yet
            lines += [f"## `{name}`", "", f"*(not available: {type(err).__name__}: {err})*", ""]
    return wrap_prose(re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip()) + "\n"


def public_names(names: list[str]) -> list[str]:
    """The short names a section documents: a module stands for its ``__all__``."""
    out = []
    for name in names:
        try:
            obj = resolve(name)
        except (ImportError, AttributeError):
            obj = None
        out += list(getattr(obj, "__all__", [])) if inspect.ismodule(obj) else [name.rsplit(".", 1)[-1]]
    return out


def generate() -> dict[Path, str]:
    """Every page of the reference: docs/api.md, the index with each section's public names, and docs/api/*.md."""
    import kdwrap

    pages: dict[Path, str] = {}
    index = [
        "# API reference",
        "",
        f"kdwrap {kdwrap.__version__}. Generated by `python docs/gen_api.py` from the docstrings: edit those, not "
        "these pages. One page per section; the public surface is the entry points, the errors and the base "
        "classes, and every option of the entry points is in [options.md](options.md).",
        "",
        "| section | what it holds | names |",
        "|---|---|---|",
    ]
    for title, intro, names in SECTIONS:
        path = PAGES_DIR / f"{slug(title)}.md"
        pages[path] = section_page(title, intro, names)
        short = ", ".join(f"`{n}`" for n in public_names(names))
        index.append(f"| [{title}](api/{path.name}) | {intro} | {short} |")
    pages[OUT] = wrap_prose("\n".join(index)) + "\n"
    return pages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if the reference is out of date; write nothing")
    args = ap.parse_args()
    pages = generate()
    stale = sorted(set(PAGES_DIR.glob("*.md")) - set(pages)) if PAGES_DIR.exists() else []
    if args.check:
        outdated = [p for p, text in pages.items() if not p.exists() or p.read_text() != text] + stale
        if outdated:
            print(f"out of date: {', '.join(str(p.relative_to(ROOT)) for p in outdated)}: run python docs/gen_api.py")
            return 1
        print(f"{OUT} and {PAGES_DIR}/ are up to date")
        return 0
    PAGES_DIR.mkdir(exist_ok=True)
    for path in stale:
        path.unlink()
    for path, text in pages.items():
        path.write_text(text)
    print(f"wrote {OUT} and {len(pages) - 1} pages in {PAGES_DIR} ({sum(len(t.splitlines()) for t in pages.values())} "
          "lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
