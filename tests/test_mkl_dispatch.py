"""The opt-in MKL AVX2 shim (usfm_edge.kernels.mkl_dispatch): CPU checks, build/caching, and its effect.

The effect test runs two fresh interpreters on real sample frames, one with USFM_EDGE_MKL_AVX2=1: the band-stop
filter must stay within the fp32 tolerance of the numpy reference under the shim, and on a CPU where the
shim applies (non-Intel x86-64 with AVX2/FMA, like this project's AMD EPYC) torch.fft must take another MKL
code path, which shows as different float rounding of the same transform.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
import warnings

import pytest

from usfm_edge.core.errors import ConfigError
from usfm_edge.kernels import mkl_dispatch as md

AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx fma avx2\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\n"
INTEL = "vendor_id\t: GenuineIntel\nflags\t\t: avx fma avx2 avx512f\n"
OLD_AMD = "vendor_id\t: AuthenticAMD\nflags\t\t: sse2 avx\n"

HAS_CC = md._compiler() is not None
APPLIES, WHY = md.shim_applicable()


def test_applicable_only_on_non_intel_x86_linux_with_avx2_fma():
    assert md.shim_applicable(AMD, "Linux", "x86_64") == (True, "AuthenticAMD CPU with AVX2 and FMA")
    ok, why = md.shim_applicable(INTEL, "Linux", "x86_64")
    assert not ok and "Intel" in why
    ok, why = md.shim_applicable(OLD_AMD, "Linux", "x86_64")
    assert not ok and "avx2, fma" in why
    ok, why = md.shim_applicable(AMD, "Darwin", "arm64")
    assert not ok and "x86-64 Linux" in why
    ok, why = md.shim_applicable("", "Linux", "x86_64")
    assert not ok and "vendor" in why


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler (cc, gcc or clang) to build the shim")
def test_build_is_cached_and_atomic(tmp_path):
    path = md.build_shim(tmp_path)
    assert path.is_file() and path.parent == tmp_path and path.name.startswith("mkl_vendor_shim-")
    stamp = path.stat().st_mtime_ns
    assert md.build_shim(tmp_path) == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left behind


def test_build_without_compiler_is_a_typed_error(tmp_path, monkeypatch):
    from usfm_edge.core.errors import BackendUnavailableError

    monkeypatch.setattr(md, "_compiler", lambda: None)
    with pytest.raises(BackendUnavailableError, match="no C compiler"):
        md.build_shim(tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler (cc, gcc or clang) to build the shim")
def test_unwritable_cache_is_a_typed_error(tmp_path):
    from usfm_edge.core.errors import BackendUnavailableError

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(BackendUnavailableError, match="cannot write the MKL vendor shim"):
        md.build_shim(blocker / "cache")


def test_damaged_cached_shim_is_a_typed_error(tmp_path, monkeypatch):
    from usfm_edge.core.errors import BackendUnavailableError

    bad = tmp_path / "mkl_vendor_shim-x.so"
    bad.write_bytes(b"not an ELF file")
    monkeypatch.setattr(md, "shim_applicable", lambda: (True, "test CPU"))
    monkeypatch.setattr(md, "shim_loaded", lambda: False)
    monkeypatch.setattr(md, "build_shim", lambda cache_dir=None: bad)
    monkeypatch.setattr(md, "sys", types.SimpleNamespace(modules={}))  # as if torch were not imported yet
    with pytest.raises(BackendUnavailableError, match="cannot load the MKL vendor shim"):
        md.enable_mkl_avx2()


def test_too_late_once_torch_is_imported(monkeypatch):
    import torch  # noqa: F401 - the point of the test

    monkeypatch.setattr(md, "shim_applicable", lambda: (True, "test CPU"))
    monkeypatch.setattr(md, "shim_loaded", lambda: False)
    with pytest.raises(ConfigError, match="before torch is imported"):
        md.enable_mkl_avx2()
    monkeypatch.setenv(md.ENV_VAR, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert md.apply_from_env().startswith("not applied")
    assert any(md.ENV_VAR in str(w.message) for w in caught)
    monkeypatch.setenv(md.ENV_VAR, "0")
    assert md.apply_from_env() is None


_PROBE = textwrap.dedent("""
    import hashlib, json, sys
    import numpy as np
    from PIL import Image
    import usfm_edge  # applies the shim when USFM_EDGE_MKL_AVX2 is set, before torch
    import torch
    from usfm_edge.kernels import BandStopMaskGenerator, band_stop_filter, band_stop_filter_np
    from usfm_edge.kernels.mkl_dispatch import shim_loaded
    paths = sys.argv[1:]
    x = np.stack([np.asarray(Image.open(p).convert("L").resize((224, 224)), np.float32) / 255 for p in paths])
    gen = BandStopMaskGenerator(224)
    masks = np.stack([gen(np.random.default_rng(i)) for i in range(len(x))])
    y = band_stop_filter(torch.from_numpy(x), torch.from_numpy(masks), symmetric=True).numpy()
    ref = np.stack([band_stop_filter_np(x[i].astype(np.float64), masks[i]) for i in range(len(x))])
    spec = torch.fft.rfft2(torch.from_numpy(x)).numpy()
    print(json.dumps({"loaded": shim_loaded(), "err": float(np.abs(y - ref).max()),
                      "bits": hashlib.sha256(spec.tobytes()).hexdigest()}))
""")


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler (cc, gcc or clang) to build the shim")
def test_shim_changes_the_mkl_path_and_keeps_parity(tmp_path, sample_dir):
    frames = sorted(str(p) for p in (sample_dir / "busbra" / "Images").glob("*.png"))[:4]
    frames += sorted(str(p) for p in (sample_dir / "hc18" / "training_set").glob("*_HC.png"))[:4]
    assert len(frames) == 8
    (tmp_path / "probe.py").write_text(_PROBE)
    out = {}
    for flag in ("0", "1"):
        env = {**os.environ, md.ENV_VAR: flag, "USFM_EDGE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"}
        proc = subprocess.run([sys.executable, str(tmp_path / "probe.py"), *frames], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        out[flag] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["0"]["loaded"]
    for flag in ("0", "1"):
        assert out[flag]["err"] < 2e-5, out  # ATOL32 of test_kernels.py: fp32 vs the float64 reference
    if not APPLIES:
        assert not out["1"]["loaded"]
        pytest.skip(f"shim loaded nowhere here ({WHY}); parity checked without it")
    assert out["1"]["loaded"]
    assert out["0"]["bits"] != out["1"]["bits"], "MKL took the same FFT path with and without the shim"


def test_info_reports_the_shim_state():
    from click.testing import CliRunner

    from usfm_edge.cli import main

    r = CliRunner().invoke(main, ["info", "--json"])
    assert r.exit_code == 0, r.output
    state = json.loads(r.output)["mkl_avx2_shim"]
    assert state["env_var"] == md.ENV_VAR and state["applicable"] == APPLIES
    assert state["loaded"] == md.shim_loaded()
    assert ("not needed" in state["state"]) == (not APPLIES and not state["loaded"])
