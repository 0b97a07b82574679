"""The import rules of DESIGN.md, checked two ways: statically over the source tree, and in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "usfm_edge"

# package -> usfm_edge packages it may import (at any level, including inside functions)
ALLOWED = {
    "core": set(),
    "kernels": {"core"},
    "models": {"core", "kernels"},
    "data": {"core", "kernels"},
    "train": {"core", "models", "data", "kernels", "evaluation"},
    "export": {"core", "models", "kernels", "runtime", "data"},
    "calibration": {"core", "runtime", "data", "evaluation", "export"},  # quantize_bundle re-exports a checkpoint
    "evaluation": {"core", "data", "runtime", "models", "export"},
    "runtime": {"core", "kernels", "data"},
    "bench": {"core", "runtime", "data", "models", "export", "calibration", "kernels", "evaluation"},
}
# modules that must not import these third-party packages at module level
NO_TOP_LEVEL = {
    "core": {"torch", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt"},
    "runtime": {"torch", "onnx", "nncf", "onnxruntime", "openvino", "tensorrt"},
    "calibration": {"torch", "nncf", "onnxruntime", "openvino", "tensorrt"},
    "evaluation": {"torch", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt"},
    "cli.py": {"torch", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt"},
}
NEVER = {"runtime": {"torch", "nncf"}, "core": {"torch"}}


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    top = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for n in names:
            yield n, node in tree.body
    return top


def _files():
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG)
        yield (rel.parts[0] if len(rel.parts) > 1 else rel.name), p


def test_internal_layering():
    bad = []
    for pkg, path in _files():
        allowed = ALLOWED.get(pkg)
        if allowed is None:
            continue
        for name, _ in _imports(path):
            if name.startswith("usfm_edge."):
                target = name.split(".")[1]
                if target != pkg and target not in allowed:
                    bad.append(f"{path.relative_to(PKG)} imports {name}")
    assert not bad, "\n".join(bad)


def test_heavy_backends_are_imported_lazily():
    bad = []
    for pkg, path in _files():
        banned = NO_TOP_LEVEL.get(pkg, set())
        never = NEVER.get(pkg, set())
        for name, top in _imports(path):
            root = name.split(".")[0]
            if (top and root in banned) or root in never:
                bad.append(f"{path.relative_to(PKG)} imports {name}{' at module level' if top else ''}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ["usfm_edge", "usfm_edge.core", "usfm_edge.runtime", "usfm_edge.kernels",
                                    "usfm_edge.data", "usfm_edge.data.readers", "usfm_edge.cli"])
def test_fresh_interpreter_import_keeps_torch_out(module):
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'nncf', 'openvino', 'onnxruntime', 'tensorrt')"
            " if m in sys.modules]; print(','.join(heavy)); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{module} pulled in {r.stdout.strip()} {r.stderr[-2000:]}"
