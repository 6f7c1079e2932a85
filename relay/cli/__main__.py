"""python -m relay.cli: the relay command."""

import sys

from relay.cli import main as command

if __name__ == "__main__":
    sys.exit(command.main())
