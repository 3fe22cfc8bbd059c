"""`python -m robustft` is the same as the `robustft` command."""

import sys

from robustft.cli import main

if __name__ == "__main__":
    sys.exit(main())
