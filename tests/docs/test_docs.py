"""The docs stay true: the API reference matches the docstrings, and every relative link points at a file."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "benchmarks" / "README.md",
         ROOT / "benchmarks" / "NOTEBOOK.md"]


def test_api_reference_is_generated_from_the_current_docstrings():
    out = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_api.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr + "\nrun: python docs/gen_api.py"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name} links to {target}, which does not exist"


def test_readme_has_exactly_the_two_setup_commands():
    block = re.search(r"## Set up.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[0].endswith("-m kdwrap demo") and commands[1].endswith("-m pytest -q")


@pytest.mark.parametrize("page", [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_prose_line_over_120_characters(page):
    """Prose wraps at 120 characters; tables, code blocks, indented blocks and a lone unbreakable link may not."""
    long, fence = [], False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if fence or line.startswith(("|", "    ")) or " " not in line.strip():
            continue
        if len(line) > 120:
            long.append(f"line {number}: {len(line)} characters")
    assert not long, f"{page.relative_to(ROOT)}: " + "; ".join(long)
