"""Virtual environments that hold only the distributions a set of requirements resolves to.

Each is made of links into this environment (nothing is downloaded or copied), so a test can run code
where exactly those packages exist: a package it imports but nobody declared fails there.
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bundle import canonical, closure  # noqa: E402  (scripts/bundle.py: requirement closures, as the bundle pins them)

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def _top_level(dist: md.Distribution) -> set[str]:
    """The site-packages entries a distribution installed (packages, modules, its .dist-info)."""
    names = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    return {n for n in names if n != "__pycache__" and not n.endswith(".pth")}


def isolated_venv(dest: Path, requirements: Iterable[str]) -> Path:
    """A virtual environment at ``dest`` holding ``requirements`` and all they require, linked from this
    one, and nothing else; returns its python."""
    base = Path(sys.base_prefix) / "bin" / f"python{PYTHON}"  # not this venv's python: nothing of it inherited
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(dest)], check=True)
    site = dest / "lib" / f"python{PYTHON}" / "site-packages"
    wanted = set(closure(requirements, PYTHON))
    owners: dict[str, set[str]] = {}
    for dist in md.distributions():
        for entry in _top_level(dist):
            owners.setdefault(entry, set()).add(canonical(dist.metadata["Name"]))
    linked = 0
    for name in wanted:
        dist = md.distribution(name)
        for entry in _top_level(dist):
            others = owners[entry] - wanted
            assert not others, f"{entry} is shared by {name} and {sorted(others)}: cannot link it alone"
            if not (site / entry).is_symlink():  # namespace folders (nvidia/) are shared among packages
                (site / entry).symlink_to(Path(dist.locate_file(entry)))
                linked += 1
    assert linked
    return dest / "bin" / "python"
