"""The README's examples run as written, so the documentation cannot drift from the code.

The fenced ``python`` block runs against a small checkpoint placed where the README says the
quickstart puts the model (``runs/faces/train/best``), on a real face crop as ``photo.jpg`` and
that crop pasted into a larger picture as ``group.jpg``.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import subset, tiny_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"


def fenced(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


@pytest.fixture
def quickstart_layout(faces_root, tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path / "runs" / "faces" / "train" / "best")
    chip = Image.open(faces_root / "final_files" / subset(faces_root, 5)["file_name"].iloc[2]).convert("RGB")
    chip.save(tmp_path / "photo.jpg")
    group = Image.new("RGB", (640, 420), (128, 128, 128))
    group.paste(chip, (220, 110))
    group.save(tmp_path / "group.jpg")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_python_example_runs(quickstart_layout, facenet):
    blocks = fenced("python")
    assert blocks, "the README has no python example"
    for block in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, str(README), "exec"), {"__name__": "readme"})
        printed = out.getvalue().splitlines()
        assert printed, "the example prints nothing"
    assert printed[0].startswith("[{'box'") and "'aligned': True" in printed[0]  # the pasted face, found
    assert printed[1].startswith("[") and len(printed[1].strip("[]").split()) == 2  # a list: one age per image


def test_readme_names_only_options_that_exist():
    """Every `age STAGE --option` in the README's shell examples is an option of that stage."""
    import importlib

    from ray_jobs.cli import STAGES

    checked = 0
    for block in fenced("bash"):
        for line in block.splitlines():
            words = line.split("#")[0].split()
            if len(words) < 2 or words[0] != "age" or words[1] not in STAGES:
                continue
            build_parser = getattr(importlib.import_module(f"ray_jobs.{words[1]}"), "build_parser", None)
            if build_parser is None:
                continue
            parser = build_parser()
            checked += 1
            known = {s for action in parser._actions for s in action.option_strings}
            for word in words[2:]:
                if word.startswith("--"):
                    assert word in known, f"README: `{line.strip()}`: age {words[1]} has no {word}"
    assert checked >= 4, "the README's shell examples name no `age` stage"


def test_the_guides_python_example_runs(quickstart_layout, facenet):
    guides = Path(__file__).resolve().parents[1] / "docs" / "guides.md"
    (blocks,) = re.findall(r"^```python\n(.*?)^```", guides.read_text(), flags=re.S | re.M)
    (quickstart_layout / "selfie.jpg").write_bytes((quickstart_layout / "group.jpg").read_bytes())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks, str(guides), "exec"), {"__name__": "guides"})
    verdict, faces = out.getvalue().split(" ", 1)
    assert verdict in ("yes", "no", "uncertain") and faces.startswith("[(") and faces.count("(") == 1  # one face
