"""The shape of the code the issues hold us to: in diredi_sim/, clients/ and server/, every
function's length (lines, docstring included) and parameter count, the worst first, and
whether any is over the limits (60 lines, 8 parameters). ``python bench/code_shape.py``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("diredi_sim", "clients", "server")
MAX_LINES, MAX_PARAMS = 60, 8


def functions(folders=FOLDERS) -> list[tuple[str, int, int]]:
    """(file:function, lines, parameters) of every function and method; ``self`` / ``cls`` not counted."""
    found = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    args = node.args
                    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                    params = len([n for n in names if n not in ("self", "cls")]) + bool(args.vararg) + bool(args.kwarg)
                    found.append((f"{path.relative_to(ROOT)}:{node.name}", node.end_lineno - node.lineno + 1, params))
    return found


def main() -> int:
    found = functions()
    print(f"{len(found)} functions in {', '.join(FOLDERS)}")
    print(f"longest (limit {MAX_LINES} lines):")
    for name, lines, _ in sorted(found, key=lambda f: -f[1])[:8]:
        print(f"  {lines:4d}  {name}")
    print(f"most parameters (limit {MAX_PARAMS}):")
    for name, _, params in sorted(found, key=lambda f: -f[2])[:8]:
        print(f"  {params:4d}  {name}")
    over = [f for f in found if f[1] > MAX_LINES or f[2] > MAX_PARAMS]
    print(f"over the limits: {len(over)}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
