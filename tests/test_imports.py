"""The import rules of DESIGN.md, checked two ways: statically over the source tree, and in a fresh interpreter.

DESIGN.md: ``core`` imports nothing of ours; ``kernels``, ``data`` import ``core``; ``models`` imports ``core``,
``kernels``; ``runtime`` imports ``core`` and the torch-free ``data.readers`` only, never torch or nncf;
``evaluation`` imports ``core``, ``data``, ``runtime``, ``models``; ``train`` imports those and ``kernels``, never
``export`` or ``calibration``; ``export`` may use ``evaluation`` for parity; ``calibration`` imports ``export``
openly (no ``importlib`` indirection); ``bench`` and ``cli`` sit on top. No two modules import each other's
private names.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "usfm_edge"

# package -> usfm_edge packages it may import (at any level, including inside functions); exactly DESIGN.md's list
ALLOWED = {
    "core": set(),
    "kernels": {"core"},
    "data": {"core"},
    "models": {"core", "kernels"},
    "runtime": {"core", "data"},
    "evaluation": {"core", "data", "runtime", "models"},
    "train": {"core", "data", "runtime", "models", "evaluation", "kernels"},
    "export": {"core", "kernels", "models", "runtime", "evaluation"},
    "calibration": {"core", "kernels", "models", "runtime", "evaluation", "export"},
}
# the only modules of an allowed package that a package may import, where DESIGN.md names them
ONLY_MODULES = {("runtime", "data"): {"usfm_edge.data.readers"}}
# modules that must not import these third-party packages at module level
NO_TOP_LEVEL = {
    "core": {"torch", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt"},
    "runtime": {"torch", "onnx", "nncf", "onnxruntime", "openvino", "tensorrt"},
    "calibration": {"torch", "nncf", "onnxruntime", "openvino", "tensorrt"},
    "evaluation": {"torch", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt"},
    "cli.py": {"torch", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt"},
    "cli_deploy.py": {"torch", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt"},
    "cli_common.py": {"torch", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt"},
}
NEVER = {"runtime": {"torch", "nncf"}, "core": {"torch"}}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    """The absolute module of a ``from`` import (relative imports resolved against ``path``)."""
    if not node.level:
        return node.module or ""
    base = _module_name(path).split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports(path: Path):
    """``(module, names imported from it, at module level)`` for every import statement of a file."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        top = node in tree.body
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], top
        elif isinstance(node, ast.ImportFrom):
            yield _absolute(node, path), [a.name for a in node.names], top


def _files():
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG)
        yield (rel.parts[0] if len(rel.parts) > 1 else rel.name), p


def test_internal_layering():
    bad = []
    for pkg, path in _files():
        allowed = ALLOWED.get(pkg)
        if allowed is None:  # bench, cli: on top of everything
            continue
        for name, _, _ in _imports(path):
            if not name.startswith("usfm_edge."):
                continue
            target = name.split(".")[1]
            if target == pkg:
                continue
            only = ONLY_MODULES.get((pkg, target))
            if target not in allowed or (only is not None and name not in only):
                bad.append(f"{path.relative_to(PKG)} imports {name}")
    assert not bad, "\n".join(bad)


def test_allowed_table_is_design_md():
    """The table above is DESIGN.md's list, nothing more: each row as stated there."""
    design = {
        "core": "", "kernels": "core", "data": "core", "models": "core kernels", "runtime": "core data",
        "evaluation": "core data runtime models", "train": "core data runtime models evaluation kernels",
        "export": "core kernels models runtime evaluation", "calibration": "core kernels models runtime evaluation export",
    }
    assert ALLOWED == {k: set(v.split()) for k, v in design.items()}
    assert ONLY_MODULES == {("runtime", "data"): {"usfm_edge.data.readers"}}


def test_no_module_imports_private_names_of_another():
    """``from usfm_edge.x import _private`` is a shared helper in the wrong place: move it into the module that owns
    it and make it public. A private module (``kernels/_triton.py``) is private to its package."""
    bad = []
    for _, path in _files():
        me = _module_name(path)
        for module, names, _ in _imports(path):
            if not module.startswith("usfm_edge") or module == me:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            parts = module.split(".")
            private += [p for i, p in enumerate(parts) if p.startswith("_") and not p.startswith("__")
                        and not me.startswith(".".join(parts[:i]) + ".")]
            if private:
                bad.append(f"{path.relative_to(PKG)} imports {', '.join(private)} from {module}")
    assert not bad, "\n".join(bad)


def test_no_two_modules_import_each_other():
    graph: dict[str, set[str]] = {}
    for _, path in _files():
        me = _module_name(path)
        for module, names, _ in _imports(path):
            if module.startswith("usfm_edge") and module != me:
                graph.setdefault(me, set()).add(module)
                graph[me] |= {f"{module}.{n}" for n in names}  # ``from usfm_edge.x import module``
    pairs = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets
                    if a in graph.get(b, set()) and not (a.startswith(b + ".") or b.startswith(a + "."))})
    assert not pairs, "\n".join(f"{a} <-> {b}" for a, b in pairs)


def test_calibration_imports_export_openly():
    bad = [str(p.relative_to(PKG)) for pkg, p in _files() if pkg == "calibration" and "importlib" in p.read_text()]
    assert not bad, f"importlib indirection in {bad}"


def test_heavy_backends_are_imported_lazily():
    bad = []
    for pkg, path in _files():
        banned = NO_TOP_LEVEL.get(pkg, set())
        never = NEVER.get(pkg, set())
        for name, _, top in _imports(path):
            root = name.split(".")[0]
            if (top and root in banned) or root in never:
                bad.append(f"{path.relative_to(PKG)} imports {name}{' at module level' if top else ''}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ["usfm_edge", "usfm_edge.core", "usfm_edge.runtime", "usfm_edge.kernels",
                                    "usfm_edge.data", "usfm_edge.data.readers", "usfm_edge.cli",
                                    "usfm_edge.evaluation", "usfm_edge.export", "usfm_edge.train.options"])
def test_fresh_interpreter_import_keeps_torch_out(module):
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'nncf', 'openvino', 'onnxruntime', 'tensorrt')"
            " if m in sys.modules]; print(','.join(heavy)); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{module} pulled in {r.stdout.strip()} {r.stderr[-2000:]}"
