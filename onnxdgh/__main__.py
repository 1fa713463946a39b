"""``python -m onnxdgh`` runs the command line."""

from .cli import main

main()
