"""docs/architecture.md's dependency rules, enforced: a pure math core, a torch-free config, no imports of cli."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "uvit_cli"
CORE = ["model.py", "schedule.py", "solvers"]  # a folder: every module in it
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


def _core_files() -> list[Path]:
    files = []
    for c in CORE:
        p = PKG / c
        assert p.exists(), f"{c}: a core module these rules guard has moved; update CORE"
        files += sorted(p.glob("*.py")) if p.is_dir() else [p]
    return files


def _module_name(p: Path) -> str:
    parts = p.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_core_imports_only_torch_einops_stdlib():
    core_modules = {_module_name(p) for p in _core_files()}
    for p in _core_files():
        bad = {m for m in _imports(p) if m.split(".")[0] not in CORE_ALLOWED and m not in core_modules}
        assert not bad, f"{p.relative_to(PKG)} imports {bad}"


def test_core_does_no_io_or_printing():
    for p in _core_files():
        calls = {
            n.func.id
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        }
        assert not calls & {"print", "open", "input"}, (
            f"{p.relative_to(PKG)} calls {calls & {'print', 'open', 'input'}}"
        )


def test_config_and_errors_import_no_torch():
    for f in ["config.py", "choices.py", "preset_files.py", "errors.py", "toml_writer.py"]:
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


# Import name -> the distribution pyproject.toml declares for it. A run-time import of anything else breaks a
# fresh install (typer 0.29 stopped installing click, and `import click` then crashed every command).
RUNTIME_DEPS = {
    "torch": "torch",
    "typer": "typer",
    "pydantic": "pydantic",
    "einops": "einops",
    "PIL": "pillow",
    "numpy": "numpy",
    "scipy": "scipy",
    "cleanfid": "clean-fid",
    "safetensors": "safetensors",
    "tomli": "tomli",
    "rich": "rich",
    "ftfy": "ftfy",
    "regex": "regex",
}
# Import name -> the optional extra of pyproject.toml that installs it; imported only when a run asks for it.
OPTIONAL = {"huggingface_hub": "hub", "tensorboard": "tensorboard", "wandb": "wandb"}


def _runtime_import_roots(path: Path) -> set[str]:
    """Top-level import roots of a module, leaving out `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    roots = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_runtime_imports_are_declared_dependencies():
    import re
    import sys

    text = (PKG.parent / "pyproject.toml").read_text()
    deps_block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    declared = {
        re.split(r"[<>=;\s\[]", d.strip().strip('",'))[0].lower() for d in re.findall(r'"[^"]+"', deps_block)
    }
    for dist in RUNTIME_DEPS.values():
        assert dist in declared, f"{dist} is not in pyproject's dependencies"
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    extras = tomllib.loads(text)["project"]["optional-dependencies"]
    for module, extra in OPTIONAL.items():
        assert any(r.startswith(module) for r in extras.get(extra, [])), (
            f"no extra {extra!r} installs {module}"
        )
    for p in PKG.rglob("*.py"):
        for root in _runtime_import_roots(p):
            if root in sys.stdlib_module_names or root == "uvit_cli" or root in OPTIONAL:
                continue
            assert root in RUNTIME_DEPS, f"{p.relative_to(PKG)} imports {root!r}, not a declared dependency"
