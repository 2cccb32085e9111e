"""The one error type a user sees: printed as a single line, exit status 2, no traceback."""

import difflib
from typing import Iterable


class FedleakError(Exception):
    """Bad input (config, data file, checkpoint): the message names the file, the field and the fix."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """The start of a fix for a typo: "did you mean 'rounds'? ", or "" when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""
