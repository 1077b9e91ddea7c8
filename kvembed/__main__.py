"""`python -m kvembed ...` and `torchrun ... -m kvembed embed-corpus ...`: the same as the `kvembed` command."""

import sys

from kvembed.cli import main

if __name__ == "__main__":
    sys.exit(main())
