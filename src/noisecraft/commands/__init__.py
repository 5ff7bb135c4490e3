"""Command-line sub-commands that live outside cli.py, one module per family; each exposes add_parsers(sub)."""
