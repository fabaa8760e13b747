"""`python -m quantize ...` is `quantgate quantize ...`."""

import sys

from quantgate.cli import main

sys.exit(main(["quantize", *sys.argv[1:]]))
