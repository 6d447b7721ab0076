"""The documentation cannot drift from the code: every `age ...` command it shows parses with the real
parser, and every HTTP path and JSON field it names is in the service's OpenAPI schema (no Ray here)."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest

from ray_jobs.cli import STAGES

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_lines(text: str) -> list[str]:
    """The lines of fenced blocks (bash, sh, text or untyped) and of indented blocks, continuations joined."""
    lines: list[str] = []
    fence, indented_block = None, True  # an indented block starts after a blank line
    for line in text.splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif fence is not None:
            if fence in ("bash", "sh", "text", ""):
                lines.append(line)
        elif line.startswith("    ") and indented_block:
            lines.append(line[4:])
        else:
            indented_block = not line.strip()
    joined, carry = [], ""
    for line in lines:
        line = carry + line.strip()
        carry = line[:-1] + " " if line.endswith("\\") else ""
        if not carry:
            joined.append(line)
    return joined


def age_commands(path: Path) -> list[str]:
    """Each ``age STAGE ...`` command of a document, a shell prompt's ``$ `` left out."""
    found = []
    for line in code_lines(path.read_text()):
        line = line.removeprefix("$ ")
        line = re.sub(r"^.*?\bpython3? -m ray_jobs\.(\w+)", r"age \1", line)  # ray job submit ... -- python -m
        for part in re.split(r"&&|;|\|", line):
            part = part.strip()
            part = part.removeprefix(".venv/bin/")
            if re.match(r"age [a-z]+( |$)", part):  # not `age serve: error: ...`, which is output
                found.append(part)
    return found


def parser(stage: str):
    module = importlib.import_module("ray_jobs.serve.app" if stage == "serve" else f"ray_jobs.{stage}")
    return module.build_parser()


COMMANDS = [(path.name, command) for path in DOCS for command in age_commands(path)]


def test_the_docs_show_commands_of_every_stage():
    shown = {shlex.split(command, comments=True)[1] for _, command in COMMANDS}
    assert {"prepare", "train", "evaluate", "score", "serve", "predict", "tune"} <= shown, shown


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_every_age_command_in_the_docs_parses(doc, command):
    words = shlex.split(command, comments=True)
    stage, args = words[1], words[2:]
    assert stage in STAGES, f"{doc}: `{command}`: no stage {stage!r}"
    if "--help" in args or "-h" in args:
        return
    p = parser(stage)
    if "..." in args or "--config" in args:  # an abbreviated line, or one whose options a file gives: names only
        known = {s for action in p._actions for s in action.option_strings}
        unknown = [w.split("=")[0] for w in args if w.startswith("--") and w.split("=")[0] not in known]
        assert not unknown, f"{doc}: `{command}`: age {stage} has no {unknown}"
        return
    try:
        p.parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{doc}: `{command}` does not parse (exit {e.code}); see the message above")


def _openapi() -> dict:
    from ray_jobs.serve.app import app

    return app.openapi()


def test_every_http_path_in_the_docs_is_a_route():
    paths = set(_openapi()["paths"])
    for doc in DOCS:
        for named in re.findall(r"(/v1/[a-z/]+[a-z]|/healthz)\b", doc.read_text()):
            assert named in paths, f"{doc.name} names {named}, which the service does not have ({sorted(paths)})"


def _fields(schemas: dict) -> set[str]:
    return {name for schema in schemas.values() for name in schema.get("properties", {})}


def _keys(value: object) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def test_every_json_field_in_the_serving_docs_is_in_the_schema():
    schema = _openapi()["components"]["schemas"]
    known = _fields(schema) | {"error", "message", "..."}
    # what the answers carry as free-form objects (preprocessing, metrics, versions) is the checkpoint's own
    free_form = {"input_size", "mean", "std", "interpolation", "face_template", "val_mae", "agecore", "torch",
                 "timm", "python"}
    text = (ROOT / "docs" / "serving.md").read_text()
    for block in re.findall(r"^```json\n(.*?)^```", text, flags=re.S | re.M):
        try:
            answer = json.loads(block)
        except json.JSONDecodeError:
            continue  # an abridged answer
        unknown = _keys(answer) - known - free_form
        assert not unknown, f"docs/serving.md shows fields the schema lacks: {sorted(unknown)}\n{block}"
