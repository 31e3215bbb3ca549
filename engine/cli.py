"""The ``saescope`` command line: the registration list. Each package owns its commands (``commands.py``: the
parser of each and what it runs); this module only orders them and turns the errors a user can fix into one line."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: spin-waiting is 3-70x slower on shared CPUs

import argparse
import errno
import sys

from .circuits import commands as circuit_commands
from .eval import commands as eval_commands
from .graph import commands as graph_commands
from .interp import commands as interp_commands
from .lock import Locked
from .precompute import commands as precompute_commands
from .tools import commands as tools_commands
from .train import commands as train_commands

COMMANDS = (tools_commands, train_commands, precompute_commands, interp_commands, eval_commands, circuit_commands,
            graph_commands)
"""Whose commands ``saescope`` offers, in the order of its help."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saescope", description="Browse, measure and steer SAE features.")
    sub = parser.add_subparsers(dest="command", required=True)
    for package in COMMANDS:
        package.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, Locked) as err:
        print(f"saescope {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise
        print(f"saescope {args.command}: error: {err} (the previous output, if any, is left as it was)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"saescope {args.command}: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
