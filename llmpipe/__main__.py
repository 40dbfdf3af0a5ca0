"""``python -m llmpipe`` runs the command-line tool."""

import sys

from llmpipe.cli.main import main

sys.exit(main())
