"""Signing keys: HS256 secrets and asymmetric keys from PEM files, their `kid`s (an RFC 7638
thumbprint for a public key), their JWKs, and new keys (`python keys.py PATH [ALGORITHM]`)."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

WEAK_KEY = (
    "must be at least 32 bytes of 10 or more distinct characters "
    "(a random key: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
)


@dataclass(frozen=True)
class Key:
    """A key that signs or verifies tokens: its algorithm, its `kid`, and for an asymmetric key
    its public half as a JWK (what the key set publishes)."""

    algorithm: str
    kid: str
    signing: Any  # what PyJWT signs with: a private key object, or the HS256 secret
    verifying: Any  # what PyJWT verifies with: the public key object, or the secret
    jwk: dict[str, str] | None = None  # None for HS256: a secret is never published


def key_id(secret: str) -> str:
    """An HS256 key's `kid`: a short fingerprint that names it without revealing it."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


def secret_key(secret: str) -> Key:
    return Key("HS256", key_id(secret), secret, secret)


def thumbprint(jwk: dict[str, str]) -> str:
    """The RFC 7638 thumbprint: SHA-256 of the key's required members, in order, no white space."""
    required = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x"), "RSA": ("e", "kty", "n")}[jwk["kty"]]
    canonical = json.dumps({name: jwk[name] for name in required}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def asymmetric_key(pem: bytes, source: str) -> Key:
    """A key from a PEM file, private or public (a fallback may be either). Its algorithm follows
    from its type: P-256 is ES256, Ed25519 is EdDSA, RSA (2048 bits or more) is RS256."""
    try:
        private: Any = serialization.load_pem_private_key(pem, password=None)
        public: Any = private.public_key()
    except (ValueError, TypeError):
        private = None
        try:
            public = serialization.load_pem_public_key(pem)
        except ValueError:
            raise ValueError(f"{source}: not a PEM private or public key") from None
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        algorithm, jwk = "ES256", ECAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ed25519.Ed25519PublicKey):
        algorithm, jwk = "EdDSA", OKPAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, rsa.RSAPublicKey) and public.key_size >= 2048:
        algorithm, jwk = "RS256", RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        raise ValueError(
            f"{source}: a P-256 (ES256), Ed25519 (EdDSA) or RSA of 2048 bits or more (RS256) key is needed"
        )
    public_jwk = {name: str(value) for name, value in jwk.items() if name in ("kty", "crv", "x", "y", "n", "e")}
    kid = thumbprint(public_jwk)
    return Key(algorithm, kid, private, public, {**public_jwk, "kid": kid, "alg": algorithm, "use": "sig"})


def new_private_key(algorithm: str = "ES256") -> bytes:
    """A new private key, as PEM (for a development key, or for an operator's rotation)."""
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if algorithm == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "EdDSA":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def read_key(name: str, path: str) -> Key:
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {path} ({exc.strerror})") from None
    return asymmetric_key(pem, name)


def check_secret(name: str, secret: str) -> None:
    """A secret that is plainly not random refuses startup."""
    if len(secret.encode()) < 32 or len(set(secret)) < 10:
        raise ValueError(f"{name} {WEAK_KEY}")


if __name__ == "__main__":
    # python keys.py PATH [ALGORITHM]: write a new private key (scripts/serve's development key).
    target = Path(sys.argv[1])
    target.parent.mkdir(parents=True, exist_ok=True)
    target.touch(mode=0o600)
    target.write_bytes(new_private_key(sys.argv[2] if len(sys.argv) > 2 else "ES256"))
