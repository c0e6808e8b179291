"""`python main.py {generate,eval,export,train} ...`: the `jaxdiff` command (jaxdiff/cli.py) from a checkout."""

import sys

from jaxdiff.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
