"""``python -m grailc ...``: the command line, also as torchrun starts it for data-parallel calibration
(``torchrun --nproc-per-node N -m grailc compress ...``)."""

import sys

from grailc.cli import main

if __name__ == "__main__":
    sys.exit(main())
