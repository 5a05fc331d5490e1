"""The README and docs/ name files of this repository; those names must stay true when files move."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # [text](target) and [text](target#anchor)
REPO_PATH = re.compile(r"`((?:lineage|merge|adapters|train|tests|benchmarks|examples|docs)/[\w./-]*)`")


def _relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_named_paths_exist(page):
    text = page.read_text()
    missing = [t for t in _relative_links(page) if not (page.parent / t).exists()]
    missing += [p for p in REPO_PATH.findall(text) if not (REPO / p).exists()]
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_every_docs_page_is_in_the_index():
    index = REPO / "docs" / "README.md"
    listed = {(index.parent / t).resolve() for t in _relative_links(index)}
    pages = {p.resolve() for p in (REPO / "docs").glob("*.md") if p != index}
    assert pages and pages <= listed, f"not in docs/README.md: {sorted(p.name for p in pages - listed)}"


def test_the_readme_points_to_the_docs():
    assert "docs/README.md" in _relative_links(REPO / "README.md")
