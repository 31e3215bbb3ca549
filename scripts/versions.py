"""Record the exact versions an environment holds, after the suite passed in it (make test-latest, make test-oldest).

    python scripts/versions.py --record requirements/latest-passed.txt

The file starts with the date, Python, platform and CPU, then one ``name==version`` line per installed
distribution (saescope itself left out), sorted: the set the suite last passed on, for docs/dependencies.md and for anyone
bisecting the next breaking release.
"""

from __future__ import annotations

import argparse
import platform
from datetime import date
from importlib import metadata
from pathlib import Path


def cpu() -> str:
    """The CPU's model name and ISA flags, as ``saescope bench`` reports them."""
    from engine.model.machine import cpu_facts

    facts = cpu_facts()
    return f"{facts.model} ({', '.join(facts.flags) or 'none of the reported ISA flags'})"


def installed() -> list[str]:
    versions = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() != "saescope":
            versions[name.lower()] = f"{name}=={dist.version}"
    return [versions[k] for k in sorted(versions)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", type=Path, required=True, help="the file to write")
    parser.add_argument("--what", default="the whole suite (make test-latest)", help="what passed, for the header")
    args = parser.parse_args()
    packages = installed()  # before cpu() imports torch, which puts setuptools' vendored packages on the path
    head = [f"# {args.what} passed on {date.today().isoformat()} with these versions",
            f"# Python {platform.python_version()} on {platform.system()} {platform.machine()}, CPU: {cpu()}"]
    args.record.write_text("\n".join(head + packages) + "\n")
    print(f"wrote {args.record}")


if __name__ == "__main__":
    main()
