"""The guide's pages (docs/) keep their promise without building them (CI builds them with `sphinx -W` after the
tests): every tutorial chapter has an equation, a link into the code that Sphinx checks, and a figure or a command;
every picture a page shows exists or is made by the build's figure script; every new viz command a page shows is
one the parser knows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
CHAPTERS = sorted((DOCS / "tutorials").glob("[0-9][0-9]-*.md"))


def test_there_are_twelve_chapters_in_the_toctree():
    index = (DOCS / "tutorials" / "index.md").read_text(encoding="utf-8")
    assert len(CHAPTERS) == 12
    for page in CHAPTERS:
        assert page.stem in index, f"{page.name} is not in tutorials/index.md"


@pytest.mark.parametrize("page", CHAPTERS, ids=lambda p: p.stem)
def test_a_chapter_has_an_equation_a_code_link_and_a_figure_or_command(page):
    text = page.read_text(encoding="utf-8")
    assert "$$" in text, "no displayed equation"
    assert re.search(r"\{py:(func|meth|class|mod)\}`noisecraft\.", text), "no link to the code"
    assert "![" in text or "noisecraft " in text, "no figure and no command"


def test_every_picture_exists_or_is_generated():
    script = (DOCS / "_scripts" / "figures.py").read_text(encoding="utf-8")
    missing = []
    for page in DOCS.rglob("*.md"):
        if "_build" in page.parts:
            continue
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text(encoding="utf-8")):
            path = (page.parent / target).resolve()
            if "_generated" in path.parts:
                if path.name not in script and re.sub(r"\d+(?=\.png$)", "{t}", path.name) not in script:
                    missing.append(f"{page.name}: {target} (not made by _scripts/figures.py)")
            elif not path.is_file():
                missing.append(f"{page.name}: {target}")
    assert not missing, missing


def test_the_viz_commands_the_pages_show_exist():
    from noisecraft.cli import build_parser

    parser = build_parser()
    for page in CHAPTERS:
        for line in re.findall(r"^noisecraft viz (\S+)", page.read_text(encoding="utf-8"), flags=re.MULTILINE):
            parser.parse_args(["viz", line])


def test_the_architecture_page_names_every_layer():
    from test_structure import LAYERS

    page = (DOCS / "architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \| (.+?) \|", page, flags=re.MULTILINE)
    named = {int(rank): set(re.findall(r"`([a-z_]+)/?`", cell)) for rank, cell in rows}
    for rank, names in enumerate(LAYERS):
        assert named.get(rank) == set(names), f"architecture.md row {rank} should name {names}, has {named.get(rank)}"
