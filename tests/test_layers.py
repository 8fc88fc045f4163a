"""The serve layers point one way: the engine (serve/engine/) imports no web framework, no metrics library, no HTTP
module and no server config, and reads no environment variable; only serve/http/ speaks HTTP and Prometheus.
Checked on the source and on a fresh interpreter's imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "serve" / "engine"
WEB = ("fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client")  # the engine reports to serve.engine.stats
FORBIDDEN_IN_ENGINE = WEB + ("serve.http", "serve.config", "serve.__main__")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_engine_sources_import_nothing_above_them():
    offences = []
    for path in sorted(ENGINE.glob("*.py")):
        for name in imported_modules(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IN_ENGINE):
                offences.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offences, "\n".join(offences)


def test_engine_reads_no_environment():
    offences = [f"{p.relative_to(ROOT)}" for p in sorted(ENGINE.glob("*.py"))
                if "os.environ" in p.read_text() or "getenv(" in p.read_text()]
    assert not offences, offences


def test_importing_the_whole_engine_loads_no_web_framework():
    modules = [f"serve.engine.{p.stem}" for p in sorted(ENGINE.glob("*.py")) if p.stem != "__init__"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {WEB!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_forbidden_import_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from starlette.responses import JSONResponse\nimport serve.http.app\n")
    assert {"starlette.responses", "serve.http.app"} <= imported_modules(bad)
