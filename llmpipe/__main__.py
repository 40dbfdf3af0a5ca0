"""``python -m llmpipe`` runs the command-line tool."""

import sys

from llmpipe.cli import main

sys.exit(main())
