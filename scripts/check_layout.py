"""Check afm's package layout: the rules of docs/design.md that code can break silently.

    python scripts/check_layout.py          # prints the problems, exit 1 if any

Reads the sources (nothing is imported or run) of ``afm/`` and ``triton_kernels/``
(installed as ``afm.triton_kernels``) and fails on

* an import cycle between afm modules (lazy imports inside functions count too);
* a private name imported across modules (``from afm.x import _helper``);
* a library module importing the ``afm`` facade (``import afm``, ``from afm import
  convert``) or one of the old-path aliases kept for users (``afm.layers`` ...);
* an import against the layer order (cli → training / lora → evaluate → export →
  analog → kernels → reference → config; see ``LAYERS``);
* a module-level ``__getattr__`` (lazy re-exports that hide cycles);
* a module over ``MAX_LINES`` lines.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500

#: Old import paths kept for users' code (they warn); afm itself never imports them.
ALIASES = {"afm.layers", "afm.patch", "afm.noise", "afm.hf"}

#: Layer of each module, by longest matching prefix: a module may import modules of
#: its own layer or lower ones.  ``afm.kernels.torch_chains`` (the torch elementwise
#: chains, importing nothing from afm) sits below the reference that calls it.
LAYERS: dict[str, int] = {
    "afm.validation": 0,
    "afm.seeds": 0,
    "afm.config": 1,
    "afm.models": 1,
    "afm.toyworld": 1,
    "afm.presets": 2,
    "afm.kernels.torch_chains": 2,
    "afm.reference": 3,
    "afm.bound_management": 3,
    "afm.kernels": 4,
    "afm.triton_kernels": 4,
    "afm.analog": 5,
    "afm.export": 6,
    "afm.interop": 6,
    "afm.evaluate": 7,
    "afm.training": 8,
    "afm.lora": 8,
    "afm.cli": 9,
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module
    names: tuple[str, ...]  # names taken with "from target import ..."
    line: int


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """``{module name: file}`` for afm and its installed kernels package."""
    out: dict[str, Path] = {}
    for base, prefix in ((root / "afm", "afm"), (root / "triton_kernels", "afm.triton_kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _resolve_relative(module: str, level: int, target: str | None, files) -> str:
    package = module if _is_package(module, files) else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{target}" if target else package


def imports_of(module: str, files: dict[str, Path]) -> list[Import]:
    tree = ast.parse(files[module].read_text(), str(files[module]))
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "afm" or alias.name.startswith("afm."):
                    found.append(Import(module, alias.name, (), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:
                base = _resolve_relative(module, node.level, node.module, files)
            if base is None or not (base == "afm" or base.startswith("afm.")):
                continue
            names = tuple(a.name for a in node.names)
            submodules = [n for n in names if f"{base}.{n}" in files]
            for n in submodules:  # "from afm.x import y" where y is a module
                found.append(Import(module, f"{base}.{n}", (), node.lineno))
            rest = tuple(n for n in names if n not in submodules)
            if rest or not submodules:
                found.append(Import(module, base, rest, node.lineno))
    return found


def _layer(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best[0])
        ):
            best = (prefix, layer)
    return None if best is None else best[1]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _has_module_getattr(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def check(root: Path = ROOT) -> list[str]:
    """Every broken rule, one line each (empty: the layout is fine)."""
    files = module_files(root)
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        where = path.relative_to(root)
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            problems.append(f"{where}: {lines} lines (over {MAX_LINES}): split it")
        if _has_module_getattr(path):
            problems.append(f"{where}: module-level __getattr__ (import what you re-export)")
        facade_ok = module == "afm" or module in ALIASES
        for imp in imports_of(module, files):
            target = imp.target
            if target not in files:
                problems.append(f"{where}:{imp.line}: imports {target}, which does not exist")
                continue
            if target != module:
                graph[module].add(target)
            if (target == "afm" or target in ALIASES) and not facade_ok:
                problems.append(
                    f"{where}:{imp.line}: imports {target} (the facade / an old-path alias); "
                    "import the module that defines the name"
                )
            private = [n for n in imp.names if _private(n)]
            if private and target != module:
                problems.append(
                    f"{where}:{imp.line}: imports private {', '.join(private)} from {target}; "
                    "make it public or move it"
                )
            src_layer, dst_layer = _layer(module), _layer(target)
            if src_layer is not None and dst_layer is not None and dst_layer > src_layer:
                problems.append(
                    f"{where}:{imp.line}: {module} (layer {src_layer}) imports {target} "
                    f"(layer {dst_layer}): dependencies run downwards (docs/design.md)"
                )
    for cycle in _cycles(graph):
        problems.append(f"import cycle: {' -> '.join(cycle)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout to check")
    root = parser.parse_args(argv).root.resolve()
    problems = check(root)
    for line in problems:
        print(line)
    n = len(module_files(root))
    print(f"check_layout: {n} modules, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
