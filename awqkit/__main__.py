"""``python -m awqkit``: the same command line as ``awqkit``."""

import sys

from awqkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
