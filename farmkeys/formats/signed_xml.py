"""XML that farmkeys writes and signs itself: a small element tree, written in its own
exclusive canonical form, and the enveloped XML signature over it.

farmkeys signs one document, the federation metadata, which it also writes, so it needs
neither an XML parser nor a canonicaliser of arbitrary input: an :class:`Element` tree is
written by one serialiser in two modes.

- ``document``: the bytes that are published. Every element is written as Exclusive XML
  Canonicalization 1.0 (https://www.w3.org/TR/xml-exc-c14n/) writes it: a start and an end
  tag (never ``<a/>``), namespace declarations before attributes, both sorted (declarations
  by prefix; attributes by namespace URI, then local name, unqualified ones first), double
  quotes, and the canonical escapes in text (``&amp; &lt; &gt; &#xD;``) and in attribute
  values (``&amp; &lt; &quot; &#x9; &#xA; &#xD;``). The only difference from the canonical
  form is where namespaces are declared: each element declares what it lists in
  :attr:`Element.namespaces`.
- ``canonical``: the exclusive canonical form of an element, as a verifier computes it from
  the parsed document: a namespace is declared on an element that visibly uses it (its own
  prefix or an attribute's) unless the nearest ancestor written declared the same one. A
  prefix used only inside an attribute's value (``xsi:type="fed:X"``) is not "visibly used",
  so the canonical form may declare it lower than the document does; the serialiser
  computes that, it is not assumed.

:func:`sign_enveloped` computes the digest of the root in canonical form with its signature
element left out (the enveloped-signature transform, then exclusive c14n), builds the
``SignedInfo`` (exclusive c14n; RSA-SHA256 with PKCS#1 v1.5, or ECDSA-SHA256 with the
signature as ``r || s``, XML-DSig 1.1 section 6.4.3), signs its canonical form, and puts the
``ds:Signature`` (the signer's certificate in ``KeyInfo/X509Data``) at the placeholder.
Both signatures are deterministic: PKCS#1 v1.5 is, and ECDSA uses RFC 6979 nonces, so the
same tree and key give the same bytes on every node.

Text must be XML 1.0 characters: anything else is a :class:`ValueError` before a byte is
written. Names are always prefixed; there is no default namespace.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

DS: Final = "http://www.w3.org/2000/09/xmldsig#"
EXC_C14N: Final = "http://www.w3.org/2001/10/xml-exc-c14n#"
ENVELOPED: Final = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
SHA256: Final = "http://www.w3.org/2001/04/xmlenc#sha256"
RSA_SHA256: Final = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"
ECDSA_SHA256: Final = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256"

# XML 1.0's Char production: what a document may hold at all.
_NOT_XML: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_NCNAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9._-]*")

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Element:
    """One element: a prefixed name (``md:EntityDescriptor``), its attributes (``name`` or
    ``prefix:name``, value), its children (elements and text, in order) and the namespaces
    it declares in the document (prefix, URI)."""

    name: str
    attributes: tuple[tuple[str, str], ...] = ()
    children: tuple[Element | str | Placeholder, ...] = ()
    namespaces: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Placeholder:
    """Where :func:`sign_enveloped` puts the ``ds:Signature``: left out of the digest."""


SIGNATURE: Final = Placeholder()


def element(
    name: str,
    *children: Element | str | Placeholder,
    attributes: Sequence[tuple[str, str]] = (),
    namespaces: Sequence[tuple[str, str]] = (),
) -> Element:
    """An :class:`Element` (a shorter spelling for trees written out by hand)."""
    return Element(name, tuple(attributes), tuple(children), tuple(namespaces))


def indented(node: Element, *, step: str = "  ", depth: int = 0) -> Element:
    """``node`` with a new line and indentation before each child element and before its end
    tag, wherever it holds elements only (an element holding text is kept as it is)."""
    if not node.children or any(isinstance(c, str) for c in node.children):
        return node
    inner = "\n" + step * (depth + 1)
    children: list[Element | str | Placeholder] = []
    for child in node.children:
        children.append(inner)
        children.append(
            indented(child, step=step, depth=depth + 1) if isinstance(child, Element) else child
        )
    children.append("\n" + step * depth)
    return replace(node, children=tuple(children))


def document(root: Element) -> bytes:
    """The published bytes: an XML declaration, then ``root`` in document mode."""
    if any(isinstance(n, Placeholder) for n in _walk(root)):
        raise ValueError("the tree still holds a signature placeholder: sign it first")
    body = _write(root, {}, {}, canonical=False)
    return ('<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n").encode("utf-8")


def canonical(node: Element, in_scope: Mapping[str, str] | None = None) -> bytes:
    """The exclusive canonical form of ``node`` (its placeholder left out), where
    ``in_scope`` are the namespaces its ancestors in the document declare."""
    return _write(node, dict(in_scope or {}), {}, canonical=True).encode("utf-8")


def sign_enveloped(
    root: Element, *, reference: str, key: SigningKey, certificate_der: bytes
) -> Element:
    """``root`` signed: the digest of its canonical form (placeholder left out) referenced as
    ``#reference`` (``root``'s ID), the ``SignedInfo`` signed with ``key``, and the
    ``ds:Signature`` holding ``certificate_der`` put where :data:`SIGNATURE` was. The
    placeholder must be a direct child of ``root``."""
    if _NCNAME.fullmatch(reference) is None:
        raise ValueError("the reference must be an NCName (an XML ID)")
    if SIGNATURE not in root.children:
        raise ValueError("the root has no signature placeholder among its children")
    if isinstance(key, rsa.RSAPrivateKey):
        method = RSA_SHA256
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        method = ECDSA_SHA256
    else:
        raise TypeError("the signing key is neither RSA nor EC")
    digest = base64.b64encode(hashlib.sha256(canonical(root)).digest()).decode("ascii")
    signed_info = element(
        "ds:SignedInfo",
        element("ds:CanonicalizationMethod", attributes=[("Algorithm", EXC_C14N)]),
        element("ds:SignatureMethod", attributes=[("Algorithm", method)]),
        element(
            "ds:Reference",
            element(
                "ds:Transforms",
                element("ds:Transform", attributes=[("Algorithm", ENVELOPED)]),
                element("ds:Transform", attributes=[("Algorithm", EXC_C14N)]),
            ),
            element("ds:DigestMethod", attributes=[("Algorithm", SHA256)]),
            element("ds:DigestValue", digest),
            attributes=[("URI", "#" + reference)],
        ),
    )
    # The signature's own element declares ds; the root's declarations are in scope too.
    in_scope = {**dict(root.namespaces), "ds": DS}
    value = _signature_value(key, canonical(signed_info, in_scope))
    signature = element(
        "ds:Signature",
        signed_info,
        element("ds:SignatureValue", base64.b64encode(value).decode("ascii")),
        element(
            "ds:KeyInfo",
            element(
                "ds:X509Data",
                element("ds:X509Certificate", base64.b64encode(certificate_der).decode("ascii")),
            ),
        ),
        namespaces=[("ds", DS)],
    )
    children = tuple(signature if c is SIGNATURE else c for c in root.children)
    return replace(root, children=children)


def _signature_value(key: SigningKey, data: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    der = key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    r, s = decode_dss_signature(der)
    size = (key.curve.key_size + 7) // 8
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


# -- the serialiser -----------------------------------------------------------------------


def _walk(node: Element | str | Placeholder) -> list[Element | str | Placeholder]:
    found: list[Element | str | Placeholder] = [node]
    if isinstance(node, Element):
        for child in node.children:
            found += _walk(child)
    return found


def _prefix(name: str) -> str:
    prefix, colon, _ = name.partition(":")
    return prefix if colon else ""


def _write(
    node: Element,
    in_scope: dict[str, str],
    rendered: dict[str, str],
    *,
    canonical: bool,
) -> str:
    """``node`` written; ``in_scope``: the namespaces declared above it in the document,
    ``rendered``: those the nearest written ancestors declared (canonical mode)."""
    scope = {**in_scope, **dict(node.namespaces)}
    used = {_prefix(node.name)} | {_prefix(name) for name, _ in node.attributes if ":" in name}
    used.discard("xml")  # bound by definition, never declared
    for prefix in used:
        if prefix == "" or prefix not in scope:
            raise ValueError(f"{node.name}: the prefix {prefix!r} is not declared")
    if canonical:
        declare = {p: scope[p] for p in used if rendered.get(p) != scope[p]}
    else:
        declare = dict(node.namespaces)
    below = {**rendered, **declare}

    def attribute_order(item: tuple[str, str]) -> tuple[str, str]:
        name = item[0]
        prefix = _prefix(name)
        return (scope[prefix] if prefix else "", name.partition(":")[2] if prefix else name)

    parts = ["<", node.name]
    for prefix in sorted(declare):
        parts.append(f' xmlns:{prefix}="{_attribute_text(declare[prefix])}"')
    for name, value in sorted(node.attributes, key=attribute_order):
        parts.append(f' {name}="{_attribute_text(value)}"')
    parts.append(">")
    for child in node.children:
        if isinstance(child, Placeholder):
            if not canonical:
                raise ValueError("a signature placeholder cannot be written")
            continue
        if isinstance(child, str):
            parts.append(_text(child))
        else:
            parts.append(_write(child, scope, below, canonical=canonical))
    parts += ["</", node.name, ">"]
    return "".join(parts)


def holds_xml(value: str) -> bool:
    """Whether ``value`` is made of characters XML 1.0 allows (what the writer refuses)."""
    return _NOT_XML.search(value) is None


def _checked(value: str) -> str:
    if _NOT_XML.search(value):
        raise ValueError("the text holds a character XML 1.0 does not allow")
    return value


def _text(value: str) -> str:
    return (
        _checked(value)
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("\r", "&#xD;")
    )


def _attribute_text(value: str) -> str:
    return (
        _checked(value)
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace('"', "&quot;")
        .replace("\t", "&#x9;")
        .replace("\n", "&#xA;")
        .replace("\r", "&#xD;")
    )
