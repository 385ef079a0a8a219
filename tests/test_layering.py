"""STYLE.md dependency rules, enforced: the math core stays pure, config stays torch-free, nothing imports cli."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "uvit_cli"
CORE = ["model.py", "schedule.py", "solvers.py"]
CORE_ALLOWED = {
    "torch",
    "einops",
    "__future__",
    "math",
    "typing",
    "collections",
    "functools",
    "dataclasses",
    "itertools",
    "enum",
    "abc",
    "warnings",
    "contextlib",
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_imports_only_torch_einops_stdlib():
    for f in CORE:
        p = PKG / f
        if not p.exists():
            continue
        core_modules = {f"uvit_cli.{c[:-3]}" for c in CORE}
        bad = {m for m in _imports(p) if m.split(".")[0] not in CORE_ALLOWED and m not in core_modules}
        assert not bad, f"{f} imports {bad}"


def test_core_does_no_io_or_printing():
    for f in CORE:
        p = PKG / f
        if not p.exists():
            continue
        calls = {
            n.func.id
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        }
        assert not calls & {"print", "open", "input"}, f"{f} calls {calls & {'print', 'open', 'input'}}"


def test_config_and_errors_import_no_torch():
    for f in ["config.py", "errors.py"]:
        bad = {m for m in _imports(PKG / f) if m.split(".")[0] in {"torch", "numpy", "typer", "rich"}}
        assert not bad, f"{f} imports {bad}"
    assert {m.split(".")[0] for m in _imports(PKG / "errors.py")} <= {"__future__"}


def test_nothing_imports_cli():
    for p in PKG.rglob("*.py"):
        if "cli" in p.relative_to(PKG).parts[:1] or p.name == "__main__.py":  # the entry points themselves
            continue
        bad = {m for m in _imports(p) if m == "uvit_cli.cli" or m.startswith("uvit_cli.cli.")}
        assert not bad, f"{p.relative_to(PKG)} imports {bad}"


def test_config_solver_names_match_the_solvers():
    from uvit_cli import solvers
    from uvit_cli.config import SOLVER_NAMES

    assert set(SOLVER_NAMES) == set(solvers.SOLVERS)
