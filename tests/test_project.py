"""The project as a user meets it: layout, set-up files, import layering."""
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_required_layout():
    for p in ["pyproject.toml", "environment.yml", "prune_lab", "notebooks", "tests", "README.md", "Makefile",
              ".ci/run", "constraints.txt"]:
        assert (ROOT / p).exists(), p


def test_environment_yml_parses_and_installs_the_project():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "prune_lab"
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert any(line.startswith("-e .") for line in pip) and "-c constraints.txt" in pip


def test_import_layers_contract():
    """widgets -> viz -> analysis -> engine -> methods/training -> core/models/data, and no UI in the engine."""
    proc = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BROKEN" not in proc.stdout


def test_engine_imports_without_ui_libraries():
    code = ("import sys, prune_lab as pl, torch; pl.prune(torch.nn.Linear(3, 3), 'lamp', 0.5); "
            "bad = [m for m in ('matplotlib', 'seaborn', 'ipywidgets', 'IPython') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
