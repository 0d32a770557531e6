"""The documentation site's examples run as written, and its API reference covers every public module.

Each page of ``docs/`` with ```python blocks runs top to bottom in a fresh
interpreter (:mod:`_markdown`, shared with the README's test). The site itself
is built by ``mkdocs build --strict`` (broken references and warnings fail).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _markdown import python_blocks, run_blocks, undefined_names

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(path for path in DOCS.rglob("*.md") if python_blocks(path))
PAGE_IDS = [str(path.relative_to(DOCS)) for path in PAGES]


def test_the_how_to_guides_have_examples() -> None:
    how_to = {path.name for path in (DOCS / "how-to").glob("*.md") if path.name != "index.md"}
    assert how_to and how_to <= {path.name for path in PAGES}


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_page_has_no_undefined_names(page: Path) -> None:
    check = undefined_names(page)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_page_python_blocks_run(page: Path, tmp_path: Path) -> None:
    run = run_blocks(page, tmp_path)
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-8000:]}"


def test_every_public_module_has_a_reference_page() -> None:
    """A module is public if no part of its dotted name starts with an underscore."""
    modules = set()
    for path in (ROOT / "mdsens").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if not any(part.startswith("_") for part in parts):
            modules.add(".".join(parts))
    directive = re.compile(r"^::: (\S+)$", re.MULTILINE)
    documented = {name for page in (DOCS / "reference").glob("*.md") for name in directive.findall(page.read_text())}
    assert modules - documented == set(), "public modules missing from docs/reference/"
    assert documented - modules == set(), "docs/reference/ documents modules that do not exist"


def test_the_front_door_page_lists_every_reexport() -> None:
    """docs/reference/mdsens.md orders the package's re-exports by hand: it must list each of them."""
    package = (ROOT / "mdsens" / "__init__.py").read_text()
    page = (DOCS / "reference" / "mdsens.md").read_text()
    reexports = set(re.findall(r"^from \S+ import (\w+) as \1$", package, re.MULTILINE))
    listed = set(re.findall(r"^ {8}- (\w+)$", page, re.MULTILINE))
    assert listed - {"__version__"} == reexports
