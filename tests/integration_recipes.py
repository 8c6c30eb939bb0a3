"""The recipes of docs/integrations.md, run by the integration tests.

They use ```py, not ```python, fences: tests/docs/test_doc_snippets.py runs every ``python`` block and cannot skip a
page whose libraries are optional extras, so each recipe runs in its library's test file, under importorskip."""
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def run_recipe(section: str, blocks: int) -> dict:
    """Run the ```py blocks of the section ``## <section>`` (there must be ``blocks`` of them) in one namespace,
    in the current directory; return that namespace."""
    body = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", DOC.read_text(), re.S | re.M).group(1)
    codes = re.findall(r"^```py\n(.*?)^```", body, re.S | re.M)
    assert len(codes) == blocks, f"docs/integrations.md, {section}: {len(codes)} ```py blocks, expected {blocks}"
    namespace = {"__name__": "__doc_snippet__"}
    for code in codes:
        exec(compile(code, f"docs/integrations.md, {section} recipe", "exec"), namespace)
    return namespace
