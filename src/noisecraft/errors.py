"""User-facing errors.

Anything a user can cause (a bad path, a corrupt file, an unknown name, a wrong shape) raises
`NoisecraftError` with one sentence that names the problem and the fix. The command line prints
that sentence and exits with status 2 instead of showing a traceback.
"""

import re


class NoisecraftError(Exception):
    """An error caused by user input; its message is one sentence: what is wrong and how to fix it.

    Line breaks inside the message (e.g. from a quoted torch error) are folded into spaces, so the message
    is always one line."""

    def __init__(self, message: object = ""):
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message)).strip())


def one_line(text: str, limit: int) -> str:
    """`text` with its whitespace runs (line breaks included) folded to single spaces, cut to `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def brief(err, limit: int = 200) -> str:
    """An exception's text, to quote inside a one-sentence error (torch's load_state_dict messages span lines)."""
    return one_line(str(err), limit)


def short_repr(value, limit: int = 80) -> str:
    """repr of a (possibly huge or nested) value, for a one-line message."""
    return one_line(repr(value), limit)
