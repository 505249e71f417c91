"""The dependency rule of the packages, read from the source, and the light imports of the CLI.

``configtree`` imports nothing of the project; ``sharding/`` and ``launch/`` import neither
``pipeline`` nor the entry layer ``samadapt``; ``pipeline/`` never imports ``launch`` or
``samadapt``. Only ``samadapt`` composes them.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("configtree", "launch", "pipeline", "samadapt", "sharding")

RULES = {
    "configtree": set(PROJECT) - {"configtree"},
    "sharding": {"pipeline", "samadapt"},
    "launch": {"pipeline", "samadapt"},
    "pipeline": {"launch", "samadapt"},
}


def imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every import in a module, also those inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(node.lineno, alias.name.split(".")[0]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("package", sorted(RULES))
def test_packages_import_only_what_the_layout_allows(package):
    forbidden = RULES[package]
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules, f"no modules under {package}/"
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in modules
        for line, name in sorted(imported_packages(path))
        if name in forbidden
    ]
    assert not bad, "\n".join(bad)


def test_the_rule_check_sees_a_violation(tmp_path):
    """The check above reads nested and dotted imports (it could not pass by reading nothing)."""
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from pipeline.config import DataConfig\n")
    assert (4, "pipeline") in imported_packages(module)


_LOADED = """
import json, sys
from samadapt.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = ("torch", "deepspeed", "mlflow", "segment_anything")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
"""


@pytest.mark.parametrize("argv", [["shard", "--help"], ["inspect", "--help"], ["--help"]])
def test_sharding_commands_do_not_load_torch(argv):
    proc = subprocess.run(
        [sys.executable, "-c", _LOADED, *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    assert "usage: samadapt" in proc.stdout


def test_python_m_samadapt_is_the_console_script():
    proc = subprocess.run(
        [sys.executable, "-m", "samadapt", "no-such-command"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2 and "samadapt: unknown command 'no-such-command'" in proc.stderr
