"""`{cli-reference}` directive: the command-line reference, generated at build time from noisecraft's argparse parser
(`noisecraft.cli.build_parser`), so the page can never drift from the code. One section per command with its
help line and the full `--help` text."""

from __future__ import annotations

import argparse

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name) or "", sub


class CliReference(SphinxDirective):
    has_content = False

    def run(self):
        from noisecraft.cli import build_parser

        parser = build_parser()
        parser.prog = "noisecraft"
        out = [nodes.literal_block(text=parser.format_help().strip(), language="text")]
        for name, help_text, sub in sorted(_subcommands(parser)):
            sub.prog = f"noisecraft {name}"
            section = nodes.section(ids=[f"cli-{name}"], names=[f"noisecraft {name}"])
            section += nodes.title(text=f"noisecraft {name}")
            if help_text:
                section += nodes.paragraph(text=help_text[:1].upper() + help_text[1:] + ".")
            section += nodes.literal_block(text=sub.format_help().strip(), language="text")
            out.append(section)
        return out


def setup(app):
    app.add_directive("cli-reference", CliReference)
    return {"parallel_read_safe": True, "version": "1"}
