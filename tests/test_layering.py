"""Layering: the command line (``linearize.cli``) imports the library; the library never imports it,
and importing the library leaves the process environment as it found it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "linearize"  # read as files: nothing here imports it
CLI = "linearize.cli"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_modules() -> list[Path]:
    """Every module of the package except the command line itself (``cli/`` and ``__main__.py``)."""
    skip = {PACKAGE_DIR / "__main__.py"}
    return sorted(
        path for path in PACKAGE_DIR.rglob("*.py")
        if path not in skip and (PACKAGE_DIR / "cli") not in path.parents
    )


def imported_names(source: str, package: str) -> set[str]:
    """Absolute names of what ``source`` (a module of ``package``) imports: ``import a.b`` gives
    ``a.b``, ``from a import b`` gives ``a`` and ``a.b``; relative imports resolve against ``package``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def imported_modules(path: Path) -> set[str]:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return imported_names(path.read_text(), package)


def imports_cli(names: set[str]) -> list[str]:
    return sorted(n for n in names if n == CLI or n.startswith(CLI + "."))


def test_the_walk_covers_the_library_and_skips_the_cli():
    names = {module_name(path) for path in library_modules()}
    assert {"linearize", "linearize.pipeline", "linearize.generation", "linearize.eval",
            "linearize.kernels.dispatch"} <= names
    assert not imports_cli(names) and "linearize.__main__" not in names


def test_the_check_catches_every_form_of_importing_the_cli():
    forms = ["import linearize.cli", "import linearize.cli.eval as e", "from linearize import cli",
             "from linearize import errors, cli as c", "from linearize.cli import main",
             "from linearize.cli.arguments import int_list", "from .. import cli", "from ..cli import main",
             "def f():\n    from linearize import cli"]
    for form in forms:
        assert imports_cli(imported_names(form, "linearize.eval")), form
    assert imports_cli(imported_names("from . import cli", "linearize"))
    for form in ["import linearize", "from linearize import clip", "from linearize.eval import command_line",
                 "from . import cli", "import linearize.client"]:
        assert not imports_cli(imported_names(form, "linearize.eval")), form


def test_no_library_module_imports_the_cli():
    offenders = {
        str(path.relative_to(PACKAGE_DIR.parent)): imports_cli(imported_modules(path))
        for path in library_modules()
    }
    assert {path: names for path, names in offenders.items() if names} == {}


IMPORT_EVERYTHING = """
import os
before = dict(os.environ)
import linearize, linearize.kernels, linearize.eval, linearize.attention_transfer, linearize.finetune, linearize.pipeline
after = dict(os.environ)
changed = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
assert dict(os.environ) == before, f"importing linearize changed the environment (name: (before, after)): {changed}"
"""


def environment_at_start() -> dict[str, str]:
    """The environment this test process started with: conftest.py and the package itself (imported
    by the fixtures) have run since, and a variable they set would hide the same change made again."""
    try:
        raw = Path("/proc/self/environ").read_bytes()  # Linux: the environment as given at exec
    except OSError:
        return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest.py sets it
    pairs = (item.decode(errors="surrogateescape").partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def test_importing_the_library_changes_no_environment_variable():
    env = environment_at_start()
    # TORCHINDUCTOR_CACHE_DIR is torch's: torch._dynamo sets it on import when unset, and importing
    # linearize imports it (linearize.hf -> transformers' GPT-2 modeling -> masking_utils). Given here.
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "torchinductor_linearize_tests"))
    result = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], cwd=PACKAGE_DIR.parent, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
