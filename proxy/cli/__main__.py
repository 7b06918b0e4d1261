"""`python -m proxy.cli`: the `spendgate` command, without the console script."""

import sys

from proxy.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
