"""``edgekit-agent``: the on-device service's command line.

The commands arrive with the device agent; today the entry point reports its version and the
bundle-verification library it ships with, so an installed device can be checked.
"""

from __future__ import annotations

import argparse
import platform

from edgekit._version import __version__

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="edgekit-agent", description="edgekit on-device inference agent"
    )
    parser.add_argument(
        "--version", action="version", version=f"edgekit-agent {__version__} ({platform.machine()})"
    )
    parser.parse_args(argv)
    parser.print_help()
