"""Check the package layering declared in pyproject.toml ([tool.saescope.layers]); run by ``make lint``.

Each layer is a line of packages separated by ``|``, highest first. A module may import from its own package, from
any lower layer, and nothing else: not from a higher layer, not from a sibling on its own layer. Every import is
checked, deferred ones inside functions included (``TYPE_CHECKING`` blocks too: they are still a dependency). Also
refused anywhere in ``engine/`` and ``dashboard/``: importing another module's private name (``from .x import _y``),
and, in ``engine/``, importing ``dashboard`` or ``streamlit``.

Usage: python scripts/layers.py [ROOT]; prints one line per violation and exits 1 when there is any.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("engine", "dashboard")


@dataclass(frozen=True)
class Violation:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def module_name(root: Path, path: Path) -> tuple[str, bool]:
    """The dotted module name of ``path`` and whether it is a package's ``__init__``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_init = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_init else parts), is_init


def imports(tree: ast.AST, module: str, is_init: bool, known: set[str]):
    """(line, imported module, imported name or None) for every import, relative ones resolved. ``from P import x``
    names the module ``P.x`` when that is a module, else ``P`` and the name ``x``."""
    package = module.split(".") if is_init else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (node.lineno, sub, None) if sub in known else (node.lineno, target, alias.name)


def owner(module: str, layers: list[list[str]]) -> tuple[int, str] | None:
    """(layer index, package) of the longest declared package containing ``module``."""
    best = None
    for i, layer in enumerate(layers):
        for pkg in layer:
            if (module == pkg or module.startswith(pkg + ".")) and (best is None or len(pkg) > len(best[1])):
                best = (i, pkg)
    return best


def check(root: Path) -> list[Violation]:
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["saescope"]["layers"]
    layers = [[p.strip() for p in line.split("|")] for line in config["engine"]]
    dashboard_may_not = set(config.get("dashboard_may_not_import", []))
    files = [p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))]
    names = {module_name(root, p)[0]: p for p in files}
    known = set(names)
    found: list[Violation] = []
    for module, path in names.items():
        is_init = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        mine = owner(module, layers)
        for line, target, name in imports(tree, module, is_init, known):
            where = f"{path.relative_to(root)}:{line}"
            top = target.split(".")[0]
            if module.startswith("engine") and top in ("dashboard", "streamlit"):
                found.append(Violation(where, f"engine code imports {top} (the engine never depends on the app)"))
                continue
            if top not in PACKAGES:
                continue
            if name is not None and name.startswith("_") and not name.startswith("__") and target != module:
                found.append(Violation(where, f"imports the private name {name} of {target}"))
            if module.startswith("dashboard"):
                if any(target == m or target.startswith(m + ".") for m in dashboard_may_not):
                    found.append(Violation(where, f"the app imports {target}: pages call the engine's API, not its CLI"))
                continue
            if target == "engine" and module != "engine":
                found.append(Violation(where, f"imports {name or 'engine'} from the package root engine/__init__.py (the "
                                              "public API, which imports every layer): import it from its module"))
                continue
            theirs = owner(target, layers)
            if mine is None or theirs is None or mine[1] == theirs[1]:
                continue  # the package root (the public API), an undeclared module, or within one package
            if theirs[0] < mine[0]:
                found.append(Violation(where, f"{mine[1]} (layer {mine[0] + 1}) imports {target} from a higher layer "
                                              f"({theirs[1]}, layer {theirs[0] + 1})"))
            elif theirs[0] == mine[0]:
                found.append(Violation(where, f"{mine[1]} imports {target} from its sibling {theirs[1]}: siblings on "
                                              f"one layer are independent (move what both need to a lower layer)"))
    return found


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[1])
    found = check(root)
    for v in found:
        print(v)
    if found:
        print(f"layers: {len(found)} violation(s) of [tool.saescope.layers] in pyproject.toml", file=sys.stderr)
        return 1
    print("layers: every import follows [tool.saescope.layers]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
