"""User-facing errors.

Anything a user can cause (a bad path, a corrupt file, an unknown name, a wrong shape) raises
`NoisecraftError` with one sentence that names the problem and the fix. The command line prints
that sentence and exits with status 2 instead of showing a traceback.
"""


class NoisecraftError(Exception):
    """An error caused by user input; its message is one sentence: what is wrong and how to fix it."""
