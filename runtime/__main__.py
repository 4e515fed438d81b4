"""`python -m coft.runtime --config line.yaml`: the same as `coft run`."""

import sys

from coft.cli import main

sys.exit(main(["run", *sys.argv[1:]]))
