"""``python -m tpshard``: the command line (see :mod:`tpshard.cli`)."""

import sys

from tpshard.cli import main

if __name__ == "__main__":
    sys.exit(main())
