"""The documentation's links point at files that exist in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "benchmarks/ACCURACY.md", "examples/relion_project.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    """Targets of the Markdown links in ``text`` that are paths in the repository (no URL, no anchor)."""
    return [
        t.split("#")[0]
        for t in LINK.findall(text)
        if not re.match(r"^[a-z]+:", t) and not t.startswith("#")
    ]


def test_relative_links_finds_paths_and_skips_urls():
    text = "see [a](docs/a.md), [b](https://x.org/b), [c](#anchor) and [d](e.md#part)"
    assert relative_links(text) == ["docs/a.md", "e.md"]


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc):
    path = ROOT / doc
    links = relative_links(path.read_text(encoding="utf-8"))
    missing = [t for t in links if not (path.parent / t).exists()]
    assert not missing, f"{doc} links to missing files: {missing}"


def test_the_readme_links_the_accuracy_record():
    assert "benchmarks/ACCURACY.md" in relative_links((ROOT / "README.md").read_text("utf-8"))
