"""Static checks that catch real bugs (undefined names, unused imports, syntax errors)."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyflakes_rules_pass():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it is a dev dependency: bash scripts/test.sh installs it)")
    res = subprocess.run([ruff, "check", "--select", "F,E9", "--output-format", "concise", "src", "tests", "bench"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_library_never_imports_training_code():
    package = ROOT / "src" / "mindhier"
    offenders = {
        str(path.relative_to(package)): sorted(m for m in imported_modules(path) if m.startswith("mindhier.train"))
        for path in package.rglob("*.py") if path.relative_to(package).parts[0] != "train"
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"library modules importing training code: {offenders}"
