"""`python -m runtime --config line.yaml`: the same as `coft run`."""

import sys

from runtime.cli import main

sys.exit(main(["run", *sys.argv[1:]]))
