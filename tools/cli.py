"""What every command-line tool shares: its parser built from the module docstring, and how it fails.

A tool's docstring is its help: the first paragraph is the description, the usage lines follow, the rest is the
epilog. A DataError (bad input, or an earlier step missing) ends the tool with `error: ...` and exit status 1,
without a traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from tools.fileio import DataError


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """`python -m <prog>`'s parser: description = the docstring's first paragraph, epilog = the rest."""
    head, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(prog=f"python -m {prog}", description=head, epilog=rest or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def run(step: Callable[[], object], errors: tuple[type[BaseException], ...] = (DataError,)) -> int:
    """Exit status of calling step(): 0, or 1 after printing `error: <message>` for one of `errors`."""
    try:
        step()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
