"""The layering rules of the project, checked."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_serving_side_core_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import lma.schema, lma.tokens, lma.features, lma.data, lma.hashspec, lma.signatures, "
        "lma.metrics\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_core_does_not_import_export_or_service():
    offenders = []
    for path in (ROOT / "lma").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n.split(".")[0] in ("model_export", "service", "loadtest")]
    assert offenders == []
