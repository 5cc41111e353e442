"""The ``edgekit`` command line (workstation side).

Commands are thin: they parse and validate arguments, call the library, and print. Errors from
the library arrive typed and are printed as one line by :class:`EdgekitGroup`.
"""

from __future__ import annotations

import click

from edgekit._version import __version__
from edgekit.cli._common import EdgekitGroup
from edgekit.cli.bundle_cmds import inspect, sign, verify
from edgekit.cli.convert_cmd import convert
from edgekit.cli.fleet_cmds import fleet, rollout, simulate
from edgekit.cli.keys_trust import keys, trust

__all__ = ["cli", "main"]


@click.group(cls=EdgekitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekit")
def cli() -> None:
    """edgekit: ship ML models to a fleet of small devices, signed and verified.

    \b
    Typical flow:
      edgekit keys generate release --dir keys
      edgekit trust init --key keys/release.pub --threshold 1 -o trust.json
      edgekit convert model.onnx --quantize auto --calibration calib.npy \
          --key keys/release.key --name digits --version 1 -o digits-1.ekb
      edgekit sign model.onnx --key keys/release.key --name digits --version 1 -o digits-1.ekb
      edgekit verify digits-1.ekb --trust trust.json
      edgekit inspect digits-1.ekb
    """


for command in (keys, trust, convert, sign, verify, inspect, fleet, rollout, simulate):
    cli.add_command(command)


def main() -> None:
    cli()
