"""The ``adaptquant`` command line: ``main`` (the subcommands), ``demo`` and the argparse types."""

from langchain_adaptquant.cli.main import main

__all__ = ["main"]
