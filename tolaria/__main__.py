"""``python -m tolaria``: the same command line as the ``tolaria`` script."""

import sys

from tolaria.cli import main

if __name__ == "__main__":
    sys.exit(main())
