"""Signed bundles: an Ed25519 signature over the exact bytes of ``SHA256SUMS`` (optional; ``usfm-edge[sign]``).

``SHA256SUMS`` covers every file of a bundle, so signing its bytes signs the whole bundle: an attacker who edits
``usfm.json`` and regenerates the sums no longer matches the signature. ``SIGNATURE`` is a small JSON file, itself
not listed in ``SHA256SUMS`` (like the device-built ``model.engine``), and a regular file (links are refused):

    {"format": "usfm-edge-signature/1", "algorithm": "ed25519", "signed_file": "SHA256SUMS",
     "key_id": "<hex SHA-256 of the 32-byte raw public key>", "signature": "<128 hex digits>"}

The signature is over the ``SHA256SUMS`` bytes alone, so a C++ host verifies it with OpenSSL
(``EVP_PKEY_ED25519``, ``EVP_DigestVerify``) over the bytes it already read; ``key_id`` only names the key.

``Engine.open(..., trusted_keys=[...])`` checks the signature over the same ``SHA256SUMS`` bytes the
verify-then-use pass parsed (``BundleFiles.sums_bytes``, read once), before any model file is read.
``cryptography`` is imported only here, lazily, when keys are given.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from usfm_edge.core.bundle_schema import SUMS_FILE
from usfm_edge.core.errors import BundleError, ConfigError, DataError, require
from usfm_edge.core.io import atomic_write_bytes
from usfm_edge.runtime.bundle_io import SIGNATURE_FILE, BundleFiles

__all__ = ["SIGNATURE_FILE", "generate_keypair", "sign_bundle", "verify_signature", "check_signature",
           "load_public_keys", "key_id"]

FORMAT = "usfm-edge-signature/1"
_SIG_LIMIT = 64 << 10


def _crypto():
    require("cryptography", "sign")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return serialization, ed25519


def _raw_public(key) -> bytes:
    serialization, _ = _crypto()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key) -> str:
    """Hex SHA-256 of the 32-byte raw Ed25519 public key."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()


def generate_keypair(out: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``signing.key`` (PEM PKCS#8, mode 0600) and ``signing.pub`` (PEM SubjectPublicKeyInfo) into ``out``.

    Raises:
        ConfigError: the files exist already (and not ``force``).
        BackendUnavailableError: ``cryptography`` is missing.
    """
    serialization, ed25519 = _crypto()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / "signing.key", out / "signing.pub"
    if not force and (priv_path.exists() or pub_path.exists()):
        raise ConfigError("a key pair exists already here", path=out, hint="choose another --out or remove it")
    key = ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(priv_path, priv, 0o600, fsync=True)
    atomic_write_bytes(pub_path, pub, 0o644, fsync=True)
    return priv_path, pub_path


def _load_private(path: Path):
    serialization, ed25519 = _crypto()
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"private key cannot be read: {exc.strerror}", path=path) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise DataError(f"not an unencrypted PEM private key ({exc})", path=path) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DataError("not an Ed25519 private key", path=path, hint="make one with usfm-edge keygen")
    return key


def load_public_keys(keys: Iterable) -> list:
    """Ed25519 public keys from PEM file paths, PEM bytes, or key objects (a private key gives its public key).

    Raises:
        DataError: a key file is unreadable or not an Ed25519 public key.
    """
    serialization, ed25519 = _crypto()
    if isinstance(keys, (str, os.PathLike, bytes, bytearray)) or not isinstance(keys, Iterable):
        keys = [keys]  # one key given alone
    out = []
    for k in keys:
        if isinstance(k, ed25519.Ed25519PublicKey):
            out.append(k)
            continue
        if isinstance(k, ed25519.Ed25519PrivateKey):
            out.append(k.public_key())
            continue
        path = None
        if isinstance(k, (bytes, bytearray)):
            data = bytes(k)
        else:
            path = Path(k)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DataError(f"public key cannot be read: {exc.strerror}", path=path) from None
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise DataError(f"not a PEM public key ({exc})", path=path) from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise DataError("not an Ed25519 public key", path=path, hint="use the signing.pub of usfm-edge keygen")
        out.append(key)
    return out


def sign_bundle(path: str | Path, private_key_path: str | Path) -> Path:
    """Sign a bundle: verify it first (sums, listing, no links), then write ``SIGNATURE`` atomically.

    Returns:
        the ``SIGNATURE`` path.

    Raises:
        BundleError: the bundle does not verify (a tampered bundle is never signed).
        DataError: the key is not an Ed25519 private key.
    """
    key = _load_private(Path(private_key_path))
    folder = Path(path)
    with BundleFiles(folder) as files:
        files.check_rest()
        sums = bytes(files.sums_bytes)
    doc = {"format": FORMAT, "algorithm": "ed25519", "signed_file": SUMS_FILE, "key_id": key_id(key.public_key()),
           "signature": key.sign(sums).hex()}
    target = folder / SIGNATURE_FILE
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise BundleError(f"'{SIGNATURE_FILE}' exists and is not a regular file", path=target)
    atomic_write_bytes(target, (json.dumps(doc, indent=1) + "\n").encode(), 0o644, fsync=True)
    return target


def _parse_signature(data: bytes, path: Path) -> tuple[str, bytes]:
    try:
        doc = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BundleError(f"{SIGNATURE_FILE} is not UTF-8 JSON", path=path) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("algorithm") != "ed25519" \
            or doc.get("signed_file") != SUMS_FILE:
        raise BundleError(f"{SIGNATURE_FILE} is not a {FORMAT} Ed25519 signature of {SUMS_FILE}", path=path)
    kid, sig = doc.get("key_id"), doc.get("signature")
    if not isinstance(kid, str) or not isinstance(sig, str):
        raise BundleError(f"{SIGNATURE_FILE} lacks its key_id or signature", path=path)
    try:
        raw = bytes.fromhex(sig)
    except ValueError:
        raise BundleError(f"{SIGNATURE_FILE} signature is not hex", path=path) from None
    if len(raw) != 64:
        raise BundleError(f"{SIGNATURE_FILE} signature has {len(raw)} bytes, an Ed25519 signature 64", path=path)
    return kid, raw


def check_signature(files, trusted_keys: Iterable) -> str:
    """Check ``SIGNATURE`` of an open :class:`~usfm_edge.runtime.bundle_io.BundleFiles` over the ``SHA256SUMS``
    bytes it parsed; returns the signer's key id.

    Raises:
        BundleError: unsigned, unreadable or link ``SIGNATURE``, a key not trusted, or a wrong signature.
        ConfigError: no trusted key, or the bundle was opened without verification.
    """
    keys = load_public_keys(trusted_keys)
    from cryptography.exceptions import InvalidSignature

    if not keys:
        raise ConfigError("trusted_keys is empty: give at least one public key")
    if not files.verify or files.sums_bytes is None:
        raise ConfigError("a signature is checked only on a verified bundle", hint="open it with verify=True")
    folder = files.folder
    if not files.exists(SIGNATURE_FILE):
        raise BundleError(f"bundle is not signed ({SIGNATURE_FILE} is missing) and trusted keys are required",
                          path=folder, hint="sign it with usfm-edge sign, or open it without trusted keys")
    kid, sig = _parse_signature(files.read_unlisted(SIGNATURE_FILE, limit=_SIG_LIMIT), folder / SIGNATURE_FILE)
    by_id = {key_id(k): k for k in keys}
    key = by_id.get(kid)
    if key is None:
        raise BundleError(f"bundle is signed by key {kid[:16]}..., which is not among the {len(keys)} trusted "
                          "key(s)", path=folder, hint="pass the signer's public key with --trusted-key")
    try:
        key.verify(sig, bytes(files.sums_bytes))
    except InvalidSignature:
        raise BundleError(f"the signature does not match {SUMS_FILE} (bundle modified after signing, or a forged "
                          f"{SIGNATURE_FILE})", path=folder, hint="re-copy the signed bundle") from None
    return kid


def verify_signature(path: str | Path, trusted_keys: Iterable) -> str:
    """Verify a bundle's files (``SHA256SUMS``, listing, no links) and its signature; returns the signer's key id.

    Raises:
        BundleError: a corrupt or tampered bundle, unsigned, untrusted signer or wrong signature.
    """
    _crypto()
    with BundleFiles(path) as files:
        kid = check_signature(files, trusted_keys)
        files.check_rest()
    return kid
