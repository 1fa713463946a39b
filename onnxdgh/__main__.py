"""``python -m onnxdgh`` runs the command line; a Ctrl-C while it loads exits 130 too."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # before cli.py is in, its own handling cannot run yet
    sys.stderr.write("error: interrupted\n")
    sys.exit(130)

main()
