"""``python -m awqkit.server CKPT --port 8000 ...``: the same server as ``awqkit serve``."""

import sys

from awqkit.server.serve import main

if __name__ == "__main__":
    sys.exit(main())
