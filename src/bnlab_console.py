"""The ``bnlab`` console script's entry point, kept outside the bnlab package.

Importing anything under ``bnlab`` runs ``bnlab/__init__.py``, which imports torch (one to several
seconds on a cold start). An entry point inside the package is therefore imported, torch with it,
before ``bnlab.lab.cli.main`` runs, and a Ctrl-C in those seconds printed a traceback of torch's
import. This module imports the command line itself, so such a Ctrl-C ends as every other one
does: one line on stderr and exit status 130 (a traceback with BNLAB_DEBUG=1).
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    """Import and run ``bnlab.lab.cli.main``; a Ctrl-C during the import ends the command with 130."""
    try:
        from bnlab.lab.cli import main as command_line
    except KeyboardInterrupt:
        if os.environ.get("BNLAB_DEBUG"):
            raise
        print("bnlab: interrupted while starting (importing torch); nothing had run", file=sys.stderr)
        return 130
    return command_line()
