"""Sphinx configuration of the noisecraft guide: furo + MyST Markdown, autodoc of the public API, a CLI reference
generated from the argparse parser, the figures made at build time (_scripts/figures.py), and MathJax served from the
build itself (no CDN: the pages render offline)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE / "_scripts"))
sys.path.insert(0, str(HERE.parent / "src"))
os.environ.setdefault("COLUMNS", "80")          # argparse's --help width in the CLI reference

project = "noisecraft"
author = "the noisecraft authors"
copyright = "2026, the noisecraft authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "cli_reference",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_generated/run", "_generated/vae", "notebooks/*.py", "notebooks/*.ipynb", "README.md"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# A broken reference fails the build (-W): every {py:func}/{py:class} must resolve. Types from other libraries in
# the signatures are not ours to document.
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"^(?!noisecraft\b).*"), (r"py:.*", r".*\.(Tensor|Module|Generator)$")]
nitpick_ignore = [("py:class", "noisecraft.data.sources.ShardDataset")]   # the streamed dataset: documented in data/sources.py, not in the API pages yet
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True}
autodoc_mock_imports = ["transformers", "diffusers"]
suppress_warnings = ["myst.header"]
highlight_language = "text"       # unlabelled blocks (docstrings, --help) are plain text, not Python

html_theme = "furo"
html_title = "noisecraft"
html_static_path = []
html_theme_options = {"navigation_with_keys": True}

# Math: MathJax 3 from the `sphinx-mathjax-offline` wheel (a PyPI package that ships MathJax 3.2 with its woff
# fonts), copied into _static/mathjax of the build, instead of Sphinx's default CDN address. No LaTeX toolchain is
# needed (imgmath would need latex + dvipng on every machine), and the equations stay selectable text.
mathjax_path = "mathjax/tex-chtml.js"


def _mathjax_dir() -> Path:
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the docs need MathJax: pip install -e '.[docs]' (sphinx-mathjax-offline).")
    return Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax"


def _copy_mathjax(app, exc):
    if exc is None and app.builder.format == "html":
        target = Path(app.outdir) / "_static" / "mathjax"
        if not (target / "tex-chtml.js").is_file():
            shutil.copytree(_mathjax_dir(), target, dirs_exist_ok=True)


def _make_figures(app):
    import figures
    from sphinx.util import logging

    figures.make_all(HERE / "_generated", log=logging.getLogger("noisecraft.figures").info)


def _plain_docstring(app, what, name, obj, options, lines):
    """noisecraft's docstrings are plain text (aligned formulas, |x| norms, <|endoftext|>), not reStructuredText:
    show each as written, preformatted, after its first sentence."""
    if not lines:
        return
    end = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))
    if any(line[:1].isspace() for line in lines[1:end]):
        end = 1
    first, rest = " ".join(line.strip() for line in lines[:end]), lines[end:]
    while rest and not rest[0].strip():
        rest = rest[1:]
    body = [first.replace("*", "\\*").replace("|", "\\|").replace("`", "").replace("_", "\\_"), ""]
    if rest:
        body += ["::", ""] + ["    " + line for line in rest] + [""]
    lines[:] = body


def setup(app):
    _mathjax_dir()
    app.connect("autodoc-process-docstring", _plain_docstring)                                   # fail early, with the fix, when MathJax is missing
    app.connect("builder-inited", _make_figures)
    app.connect("build-finished", _copy_mathjax)
