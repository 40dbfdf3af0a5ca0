"""``python -m llmpipe`` runs the command-line tool."""

import sys

from llmpipe.cli.main import main

if __name__ == "__main__":  # not when a --workers process (spawned) imports this as its main module
    sys.exit(main())
