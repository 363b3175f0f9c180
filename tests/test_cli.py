import importlib
import runpy
from pathlib import Path

import pytest

from soho.cli.pretrain import main as pretrain

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
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
