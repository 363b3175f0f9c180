import ast
import importlib
import re
import runpy
import sys
from pathlib import Path

import pytest

from soho.cli.pretrain import main as pretrain

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SCRIPTS = PROJECT["scripts"]
CHECKOUT_SCRIPTS = sorted([*(ROOT / "tools").glob("*.py"), *(ROOT / "data_scripts").glob("*.py")])


def test_every_console_script_names_a_main():
    for command, target in SCRIPTS.items():
        module, function = target.split(":")
        assert command == "soho-" + module.removeprefix("soho.cli.").replace("_", "-")
        assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize("path", CHECKOUT_SCRIPTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_checkout_scripts_run_their_console_script(path, capsys, monkeypatch):
    # The README runs these files directly: they must work with the package installed, without sys.path edits.
    assert f"soho-{path.stem.replace('_', '-')}" in SCRIPTS
    assert "sys.path" not in path.read_text()
    monkeypatch.setattr("sys.argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(path), run_name="__main__")
    assert stopped.value.code == 0 and "usage:" in capsys.readouterr().out


def test_pretrain_without_a_config_outside_a_checkout_says_where_to_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        pretrain([])
    assert stopped.value.code == 2
    assert "run from the root of a soho checkout or pass --config" in capsys.readouterr().err


DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "faiss": "faiss-cpu"}
"""Distributions whose module has another name."""
OPTIONAL = {"soho/analysis/figures.py": "analysis", "soho/analysis/curves.py": "analysis"}
"""Modules that may import what only an extra installs (and say so when it is missing)."""


def imported_distributions(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    top = {name.split(".")[0] for name in names}
    return {DISTRIBUTIONS.get(name, name) for name in top - set(sys.stdlib_module_names) - {"soho", "__future__"}}


def requirement_names(requirements) -> set:
    return {re.match(r"[A-Za-z0-9_.-]+", requirement).group().lower() for requirement in requirements}


def test_dependencies_are_what_the_library_imports():
    required = requirement_names(PROJECT["dependencies"])
    imported, optional = set(), {}
    for path in sorted((ROOT / "soho").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        if name in OPTIONAL:
            optional[OPTIONAL[name]] = imported_distributions(path) - required
        else:
            imported |= imported_distributions(path)
    assert imported == required
    for extra, distributions in optional.items():
        assert distributions <= requirement_names(PROJECT["optional-dependencies"][extra])
