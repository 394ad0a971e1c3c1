"""``python -m rsd.eval ARGS`` is ``rsd eval ARGS``."""

import sys

from rsd.cli import main

sys.exit(main(["eval", *sys.argv[1:]]))
