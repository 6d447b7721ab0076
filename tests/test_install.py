"""`pip install .` alone is enough: every module of the project imports where only the declared
dependencies (no extras) and what they require are installed."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.isolated import ROOT, isolated_venv

sys.path.insert(0, str(ROOT / "scripts"))
from bundle import project_requirements  # scripts/bundle.py: the declared dependencies, from the metadata

IMPORT_ALL = """
import importlib, pkgutil, sys
names = []
for top in ("agecore", "ray_jobs"):
    package = importlib.import_module(top)
    names += [top] + [m.name for m in pkgutil.walk_packages(package.__path__, top + ".") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_every_module_imports_with_the_declared_dependencies_alone(tmp_path):
    requirements = project_requirements()
    assert any(r.startswith("ray[") for r in requirements), requirements
    python = isolated_venv(tmp_path / "venv", requirements)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(ROOT)  # the project's own packages, as `pip install .` puts them
    # the isolation holds: what the project does not declare (the test tools, the optional detector) is absent
    absent = subprocess.run([str(python), "-c", "import pytest"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "No module named 'pytest'" in absent.stderr, absent.stderr
    done = subprocess.run([str(python), "-c", IMPORT_ALL], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) >= 30  # agecore's and ray_jobs' modules, the serving package's included
