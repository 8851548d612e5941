"""Layer 5: the ``eamvit`` command, one file per command group; parses arguments and calls the API."""
from eamvit.cli.main import main

__all__ = ["main"]
