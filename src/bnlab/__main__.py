"""`python -m bnlab ...` runs the bnlab command line (needed by `torchrun -m bnlab`)."""

import sys

from bnlab.lab.cli import main

sys.exit(main())
