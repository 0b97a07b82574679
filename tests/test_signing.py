"""Signed bundles (``runtime.signing``): Ed25519 over the bytes of ``SHA256SUMS``; ``Engine.open(trusted_keys=...)``
refuses unsigned, untrusted, forged or re-summed bundles before any model file is read; the CLI flow.

Bundle: ``usfm_vit_test`` at 64 px (seg, random weights) exported to ONNX once per module; frames: real BUS-BRA.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import export_test_seg
from PIL import Image

from usfm_edge.core.errors import BackendUnavailableError, BundleError
from usfm_edge.runtime import Engine
from usfm_edge.runtime.bundle_io import format_sums

pytest.importorskip("cryptography")

from usfm_edge.runtime.signing import generate_keypair, sign_bundle, verify_signature  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "usfm_edge" / "assets" / "sample"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return export_test_seg(tmp_path_factory.mktemp("sign"))["onnx"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    a = generate_keypair(d / "a")
    b = generate_keypair(d / "b")
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    p = sorted((SAMPLE / "busbra" / "Images").glob("*.png"))[0]
    return np.asarray(Image.open(p).convert("L"))


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "b.usfm"))


def _resum(folder: Path) -> None:
    sums = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())
            if f.name not in ("SHA256SUMS", "SIGNATURE", "model.engine")}
    (folder / "SHA256SUMS").write_text(format_sums(sums))


def test_keygen_writes_a_private_key_only_its_owner_reads(keys):
    priv, pub = keys["a"]
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    assert not [p for p in priv.parent.iterdir() if p.name.endswith(".tmp")]


def test_signed_bundle_opens_with_the_right_key_and_gives_the_same_masks(bundle, keys, frame, tmp_path):
    p = _copy(bundle, tmp_path)
    sign_bundle(p, keys["a"][0])
    doc = json.loads((p / "SIGNATURE").read_text())
    assert doc["signed_file"] == "SHA256SUMS" and len(bytes.fromhex(doc["signature"])) == 64
    assert verify_signature(p, [keys["a"][1]]) == doc["key_id"]
    with Engine.open(bundle) as plain, Engine.open(p, trusted_keys=[keys["a"][1]]) as signed:
        a, b = plain.predict(frame), signed.predict(frame)
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.probs, b.probs)
    with Engine.open(p) as engine:  # a signed bundle still opens without keys
        assert engine.predict(frame).mask.shape == frame.shape


def _no_model_read(monkeypatch):
    """Make any model load fail loudly: refusals must come before a backend is created."""
    import usfm_edge.runtime.engine as eng

    def boom(*a, **k):
        raise AssertionError("a backend was created before the signature was checked")

    monkeypatch.setattr(eng, "make_backend", boom)


def _wrong_key(p, keys):
    sign_bundle(p, keys["b"][0])
    return "not among"


def _unsigned(p, keys):
    return "not signed"


def _tampered_signature(p, keys):
    sign_bundle(p, keys["a"][0])
    doc = json.loads((p / "SIGNATURE").read_text())
    sig = bytearray(bytes.fromhex(doc["signature"]))
    sig[5] ^= 1
    doc["signature"] = sig.hex()
    (p / "SIGNATURE").write_text(json.dumps(doc))
    return "does not match"


def _resummed_after_edit(p, keys):
    sign_bundle(p, keys["a"][0])
    meta = json.loads((p / "usfm.json").read_text())
    meta["labels"] = list(reversed(meta["labels"]))
    (p / "usfm.json").write_text(json.dumps(meta))
    _resum(p)  # the attacker rewrites SHA256SUMS: the files verify, the signature does not
    return "does not match"


def _signature_symlink(p, keys):
    sign_bundle(p, keys["a"][0])
    outside = p.parent / "sig-outside"
    (p / "SIGNATURE").rename(outside)
    (p / "SIGNATURE").symlink_to(outside)
    return "symbolic link"


def _signature_not_json(p, keys):
    (p / "SIGNATURE").write_bytes(b"\xff\x00 not json")
    return "not UTF-8 JSON"


def _signature_doc(**edit):
    def build(p, keys):
        sign_bundle(p, keys["a"][0])
        doc = json.loads((p / "SIGNATURE").read_text())
        doc.update(edit)
        (p / "SIGNATURE").write_text(json.dumps(doc))
        return "SIGNATURE"

    return build


def _signature_huge(p, keys):
    (p / "SIGNATURE").write_bytes(b" " * (1 << 20))
    return "more than"


REFUSALS = {"key-id-int": _signature_doc(key_id=7), "signature-odd-hex": _signature_doc(signature="abc"),
            "signature-short": _signature_doc(signature="00" * 10), "other-algorithm": _signature_doc(algorithm="rsa"),
            "signs-other-file": _signature_doc(signed_file="usfm.json"), "signature-huge": _signature_huge,
            "wrong-key": _wrong_key, "unsigned": _unsigned, "tampered-signature": _tampered_signature,
            "resummed-after-edit": _resummed_after_edit, "signature-symlink": _signature_symlink,
            "signature-not-json": _signature_not_json}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_before_any_model_is_loaded(bundle, keys, tmp_path, monkeypatch, case):
    p = _copy(bundle, tmp_path)
    why = REFUSALS[case](p, keys)
    _no_model_read(monkeypatch)
    with pytest.raises(BundleError, match=why) as err:
        Engine.open(p, trusted_keys=[keys["a"][1]])
    assert str(p) in str(err.value)


def test_resummed_bundle_still_verifies_without_keys(bundle, keys, tmp_path):
    """The attack the signature is for: regenerated sums fool the checksum pass alone."""
    p = _copy(bundle, tmp_path)
    _resummed_after_edit(p, keys)
    from usfm_edge.runtime.bundle_io import verify_bundle

    verify_bundle(p)  # passes: only the signature tells
    with pytest.raises(BundleError, match="does not match"):
        verify_signature(p, [keys["a"][1]])


def test_signature_symlink_is_refused_even_without_keys(bundle, keys, tmp_path):
    p = _copy(bundle, tmp_path)
    _signature_symlink(p, keys)
    with pytest.raises(BundleError, match="symbolic link"):
        Engine.open(p)


def test_unsigned_bundle_opens_without_keys(bundle, frame):
    with Engine.open(bundle) as engine:
        assert engine.predict(frame).mask.shape == frame.shape


def test_one_key_alone_and_an_empty_key_list(bundle, keys, tmp_path):
    from usfm_edge.core.errors import ConfigError

    p = _copy(bundle, tmp_path)
    sign_bundle(p, keys["a"][0])
    Engine.open(p, trusted_keys=keys["a"][1], warmup=0).close()  # a single path, not a list
    with pytest.raises(ConfigError, match="empty"):
        Engine.open(p, trusted_keys=[])
    with pytest.raises(ConfigError, match="verify"):
        Engine.open(p, trusted_keys=[keys["a"][1]], verify=False)


def test_evaluate_refuses_an_untrusted_bundle(bundle, keys, tmp_path):
    from usfm_edge.core.errors import ConfigError
    from usfm_edge.evaluation.evaluate import open_predictor

    p = _copy(bundle, tmp_path)
    sign_bundle(p, keys["b"][0])
    with pytest.raises(BundleError, match="not among"):
        open_predictor(p, trusted_keys=[keys["a"][1]])
    eng, task, _ = open_predictor(p, trusted_keys=[keys["b"][1]])
    eng.close()
    with pytest.raises(ConfigError, match="checkpoint"):
        open_predictor(keys["a"][1], trusted_keys=[keys["a"][1]])


def test_missing_cryptography_names_the_extra(bundle, keys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(BackendUnavailableError, match=r"usfm-edge\[sign\]"):
        Engine.open(bundle, trusted_keys=[keys["a"][1]])


def _cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", "from usfm_edge.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_keygen_sign_predict_trusted_key(bundle, frame, tmp_path):
    p = _copy(bundle, tmp_path)
    img = tmp_path / "frame.png"
    Image.fromarray(frame).save(img)
    r = _cli("keygen", "--out", tmp_path / "k")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli("keygen", "--out", tmp_path / "other")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli("sign", p, "--key", tmp_path / "k" / "signing.key")
    assert r.returncode == 0 and (p / "SIGNATURE").is_file(), r.stderr[-2000:]
    r = _cli("predict", p, img, "--out", tmp_path / "ok", "--no-overlays",
             "--trusted-key", tmp_path / "other" / "signing.pub", "--trusted-key", tmp_path / "k" / "signing.pub")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "ok" / "results.json").exists()
    for case, key in (("untrusted", tmp_path / "other" / "signing.pub"), ("unsigned", tmp_path / "k" / "signing.pub")):
        if case == "unsigned":
            (p / "SIGNATURE").unlink()
        r = _cli("predict", p, img, "--out", tmp_path / case, "--trusted-key", key)
        assert r.returncode == 1, (case, r.returncode, r.stderr[-2000:])
        assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
        last = [x for x in r.stderr.splitlines() if x.strip()][-1]
        assert last.startswith("error: ") and str(p) in last, last
        assert not (tmp_path / case / "results.json").exists()
