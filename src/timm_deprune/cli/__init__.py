"""The ``timm-deprune`` command line: :mod:`.app` (parser and ``main``), :mod:`.commands` (one function per
subcommand), :mod:`.sources` (where models come from, and the one-line :class:`CliError`)."""
from .app import build_parser, main
from .sources import CliError

__all__ = ["main", "build_parser", "CliError"]
