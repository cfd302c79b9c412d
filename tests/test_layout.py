"""The package's floors: every module imports only from its own floor or the floors below it,
and no import cycle exists, counting imports inside functions too (they hide knots)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmdistill"
# Lowest first. A module belongs to the floor of its longest matching prefix.
FLOORS = {
    "mmdistill": 0,  # core: errors, io, registry, config, console, runs, sweeps
    "mmdistill.data": 1,
    "mmdistill.models": 2,
    "mmdistill.training": 3,
    "mmdistill.methods": 4,
    "mmdistill.report": 5,
    "mmdistill.jobs": 6,
    "mmdistill.cli": 7,
    "mmdistill.api": 8,  # the Python API: load a set, run a verb
    "mmdistill.__main__": 8,
}
FRONT_DOOR = "mmdistill"  # the package's __init__: exports the API, so it sits on top


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def floor(module: str) -> int:
    if module == FRONT_DOOR:
        return max(FLOORS.values()) + 1
    prefix = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[prefix]


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Every mmdistill module `name` imports, wherever the import statement sits."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, name, known) for name, path in known.items()}


def test_no_module_imports_from_a_higher_floor() -> None:
    upward = [
        f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)})"
        for a, deps in graph().items()
        for b in deps
        if floor(b) > floor(a)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_there_are_no_import_cycles() -> None:
    g = graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(g[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path: Path) -> None:
    """The two checks above can fail: a hidden function-level import is found."""
    (tmp_path / "a.py").write_text("def f():\n    from mmdistill.cli import main\n")
    known = {"mmdistill.data.a": tmp_path / "a.py", "mmdistill.cli": PACKAGE / "cli.py"}
    assert imports(tmp_path / "a.py", "mmdistill.data.a", known) == {"mmdistill.cli"}
    assert floor("mmdistill.data.a") < floor("mmdistill.cli")


def test_the_readme_layout_names_every_module_once() -> None:
    """docs/layout.md's Layout draws the floors one line per module: it must match the tree."""
    readme = (PACKAGE.parent / "docs" / "layout.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed, folders = [], {}  # indent -> the folder open at that depth
    for line in block.splitlines():
        name, indent = line.strip().split(" ", 1)[0], len(line) - len(line.lstrip())
        if indent < 2 or not name:
            continue
        parent = "".join(folders[d] for d in sorted(folders) if d < indent)
        if name.endswith("/"):  # a package folder, nested under the ones above it
            folders = {d: f for d, f in folders.items() if d < indent} | {indent: name}
        elif name.endswith(".py"):
            folders = {d: f for d, f in folders.items() if d < indent}
            listed.append(parent + name)
    actual = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py"))
    missing = (
        set(actual)
        - set(listed)
        - {"__init__.py", "training/__init__.py", "report/__init__.py", "models/__init__.py"}
    )
    assert not missing, f"modules not in docs/layout.md's Layout: {sorted(missing)}"
    assert not set(listed) - set(actual), "docs/layout.md's Layout names modules that do not exist"
    assert len(listed) == len(set(listed))
