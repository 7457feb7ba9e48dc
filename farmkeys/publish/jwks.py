"""The JSON Web Key Set of the signing keys (RFC 7517), as AD FS's ``/adfs/discovery/keys``."""

from __future__ import annotations

import base64
import json

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from farmkeys.errors import PublishError
from farmkeys.publish.keys import Published, PublishedKey, b64url


def jwks(keys: Published) -> bytes:
    """The JSON Web Key Set of the signing keys (RFC 7517), as ``/adfs/discovery/keys``
    serves it: ``kid`` and ``x5t`` are the base64url SHA-1 thumbprint."""
    documents = []
    for key in keys.signing:
        jwk = _public_jwk(key) | {
            "use": "sig",
            "kid": key.x5t,
            "x5t": key.x5t,
            "x5c": [base64.b64encode(key.der).decode("ascii")],
        }
        documents.append(jwk)
    return (json.dumps({"keys": documents}, indent=2) + "\n").encode("utf-8")


def _public_jwk(key: PublishedKey) -> dict[str, object]:
    """The members of ``key``'s JWK that describe its public key: RSA or P-256."""
    public = key.certificate.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        return {"kty": "RSA", "alg": "RS256", "n": _b64uint(numbers.n), "e": _b64uint(numbers.e)}
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1":
        point = public.public_numbers()
        return {
            "kty": "EC",
            "alg": "ES256",
            "crv": "P-256",
            "x": b64url(point.x.to_bytes(32, "big")),
            "y": b64url(point.y.to_bytes(32, "big")),
        }
    raise PublishError(
        f"signing certificate {key.thumbprint} has a key JWKS cannot describe",
        "use policy.key rsa-* or ec-p256",
    )


def _b64uint(n: int) -> str:
    return b64url(n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big"))
