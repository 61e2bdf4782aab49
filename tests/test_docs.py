"""The repository stands alone: it cites no document it does not hold, and its Markdown links resolve.

The method and design notes once lived beside the repository (a method spec and an architecture note);
a clone does not have them, so code, configs and docs must cite docs/method.md and docs/design.md instead.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "runs", "data", "__pycache__", ".ruff_cache"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".cfg", ".toml", ".sh", ".txt", ".cff"}
OUTSIDE_DOCS = re.compile(r"\bSPEC\b|ARCHITECTURE\.md|\.\./shared/|/work/shared")


def repository_files():
    for path in ROOT.rglob("*"):
        wanted = path.suffix in TEXT_SUFFIXES or path.name in ("Makefile", "run")
        if path.is_file() and wanted and not SKIP_DIRS.intersection(path.relative_to(ROOT).parts):
            yield path


def test_no_citation_of_documents_outside_the_repository():
    this = Path(__file__).resolve()
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in repository_files()
        if path.resolve() != this
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE_DOCS.search(line)
    ]
    assert not hits, "cite docs/method.md or docs/design.md instead:\n" + "\n".join(hits)


def _anchors(markdown: Path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_markdown_links_resolve():
    broken = []
    for markdown in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for link in re.findall(r"\]\(([^)\s]+)\)", markdown.read_text()):
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            target, _, anchor = link.partition("#")
            path = (markdown.parent / target).resolve() if target else markdown
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
                broken.append(f"{markdown.relative_to(ROOT)}: {link}")
    assert not broken, "broken links:\n" + "\n".join(broken)
