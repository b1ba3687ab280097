"""The layering rules of the project, checked."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_serving_side_core_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import lma.schema, lma.tokens, lma.features, lma.data, lma.hashspec, lma.signatures, "
        "lma.metrics, lma.bundle, lma.predictor\n"
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


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


def test_a_bundle_serves_without_torch_or_onnx(tmp_path):
    """The serving-only install (core + the ``serve`` extra: onnxruntime) opens a bundle, checks
    it and scores rows: nothing on that path may import torch or onnx."""
    from lma.train import TrainConfig, train_model
    from model_export.bundle import export_bundle
    from model_export.predict import Predictor

    train_model(TrainConfig(data="synth:800:2", embedding="lma", compression=4, epochs=1,
                            first_order=True, warmup_epochs=1, progress=False, threads=1,
                            out=str(tmp_path / "ck")))
    bundle = export_bundle(tmp_path / "ck", tmp_path / "bundle", sample_rows=32)
    expected = Predictor.open(bundle, "onnx").predict(*_rows())
    np.save(tmp_path / "expected.npy", expected)
    code = (
        "import sys\n"
        "sys.modules['torch'] = None; sys.modules['onnx'] = None  # importing them now fails\n"
        "import numpy as np\n"
        "from lma.data import open_source\n"
        "from lma.predictor import Predictor\n"
        f"p = Predictor.open({str(bundle)!r}, 'onnx')\n"
        "d = open_source('synth:50:9').read_all()\n"
        "got = p.predict(d.dense, d.tokens)\n"
        "p.warmup(rows=64)\n"
        "assert p.providers_in_use() == ['CPUExecutionProvider']\n"
        "assert p.bundle.component_bytes()['total'] > 0 and p.bundle.schema.n_token_slots\n"
        f"assert np.allclose(got, np.load({str(tmp_path / 'expected.npy')!r}), atol=1e-6)\n"
        "from lma.cli import main\n"
        f"assert main(['-q', 'predict', {str(bundle)!r}, '--data', 'synth:50:9', '--out', "
        f"{str(tmp_path / 'p.txt')!r}]) == 0\n"
        "print(sorted(m for m in ('torch', 'onnx') if sys.modules.get(m) is not None))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"
    assert np.allclose(np.loadtxt(tmp_path / "p.txt"), expected, atol=1e-6)


def _rows():
    from lma.data import open_source

    d = open_source("synth:50:9").read_all()
    return d.dense, d.tokens


def test_serving_only_install_needs_no_training_extras():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    serving = project["dependencies"] + project["optional-dependencies"]["serve"]
    names = {d.split("==")[0].split("[")[0].strip().lower() for d in serving}
    assert "onnxruntime" in names
    assert not names & {"torch", "onnx", "onnxscript", "matplotlib", "scikit-learn", "ninja"}
    # Every direct dependency is pinned.
    for group in [project["dependencies"], *project["optional-dependencies"].values()]:
        assert all("==" in d for d in group), group
