"""Imports flow one way: engine/ never imports serving/ (or ray, fastapi, pydantic); the wire protocol never
imports torch; the serving folders import each other only downward (launch -> api -> pipeline -> stages)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVE_APP = ROOT / "serve_app"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


@pytest.mark.parametrize("path", _files(SERVE_APP / "engine"), ids=lambda p: str(p.relative_to(ROOT)))
def test_engine_imports_nothing_from_serving(path):
    bad = {m for m in _imports(path)
           if m.startswith(("serve_app.serving", "ray", "fastapi", "pydantic", "starlette"))}
    assert not bad, f"{path.name} imports {sorted(bad)}: the engine is plain torch (shared types: serve_app.contracts)"


@pytest.mark.parametrize("name", ["serve_app/contracts.py", "serve_app/serving/protocol.py"])
def test_wire_types_import_no_torch(name):
    assert not {m for m in _imports(ROOT / name) if m.split(".")[0] == "torch"}


# a folder may import the ones after it, never the ones before (shared modules at serving/ top level are below all)
ORDER = ["launch", "api", "pipeline", "stages"]


@pytest.mark.parametrize("path", [p for d in ORDER for p in _files(SERVE_APP / "serving" / d)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_serving_folders_import_downward_only(path):
    here = ORDER.index(path.parent.name)
    up = {m for m in _imports(path) for d in ORDER[:here] if m.startswith(f"serve_app.serving.{d}")}
    assert not up, f"{path.relative_to(ROOT)} imports {sorted(up)}, which is above it ({' -> '.join(ORDER)})"


@pytest.mark.parametrize("name", ["config.py", "errors.py", "protocol.py", "metrics.py", "audio.py", "router_settings.py"])
def test_shared_serving_modules_import_no_folder(name):
    bad = {m for m in _imports(SERVE_APP / "serving" / name) for d in ORDER if m.startswith(f"serve_app.serving.{d}")}
    assert not bad, f"serving/{name} is below every folder but imports {sorted(bad)}"


@pytest.mark.parametrize("path", _files(SERVE_APP / "model"), ids=lambda p: str(p.relative_to(ROOT)))
def test_model_loading_imports_no_engine_or_serving(path):
    """model/ (checkpoints, presets, surgery on the upstream modules) sits below the engines and the app."""
    bad = {m for m in _imports(path) if m.startswith(("serve_app.engine", "serve_app.serving"))}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}, which is above it"
