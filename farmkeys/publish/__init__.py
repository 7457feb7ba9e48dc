"""Publishing the farm's keys to relying parties: SAML metadata, JWKS, and the HTTP endpoints.

Relying parties learn the token-signing certificates from the IdP's SAML metadata
(AD FS: ``/FederationMetadata/2007-06/FederationMetadata.xml``) or, for OpenID
Connect, from a JSON Web Key Set (AD FS: ``/adfs/discovery/keys``). Both are built
from the node's installed store, never from the config DB, so any node answers
and every node answers the same bytes for the same installed set:

- signing: the primary, the secondary (so relying parties learn it before it
  signs), and every retired certificate until its NotAfter, in that order
  (retired ones newest first);
- encryption (metadata only): the primary decryption certificate, the one
  relying parties encrypt tokens to.

A fetch that carries ``?rp=<name>`` of a relying party in ``[publish]
relying_parties`` is recorded in the config DB with the signing thumbprints it
was served; ``policy.require_fetch`` holds a promotion back until every relying
party has fetched the secondary (:mod:`farmkeys.policy`). The attribution is
what the caller claims; docs/security.md says why that is enough.

The parts, each its own module:

- :mod:`~farmkeys.publish.keys`: the keys an installed set publishes, the view the
  documents share;
- :mod:`~farmkeys.publish.metadata`: the federation metadata document (SAML 2.0 and the
  WS-Federation role), signed with the signing primary for a window of one day;
- :mod:`~farmkeys.publish.jwks`: the JSON Web Key Set;
- :mod:`~farmkeys.publish.cache`: the documents built once per installed set, and
  ``/metrics`` made at most once per :data:`METRICS_CACHE_SECONDS`;
- :mod:`~farmkeys.publish.server`: the HTTP server (waitress), with its backlog, its
  bounded handler pool (503 with ``Retry-After`` past it) and a whole-request deadline;
- :mod:`~farmkeys.publish.http`: the :class:`Publisher` and what each path answers.
"""

from __future__ import annotations

from farmkeys.publish.cache import etag
from farmkeys.publish.http import (
    HEALTH_PATH,
    JWKS_PATH,
    METADATA_PATH,
    METRICS_CACHE_SECONDS,
    METRICS_PATH,
    RECORD_EVERY_SECONDS,
    Answer,
    Health,
    Publisher,
)
from farmkeys.publish.jwks import jwks
from farmkeys.publish.keys import (
    PrimaryKey,
    Published,
    PublishedKey,
    from_store,
    primary_key,
    published,
    signing_from_store,
)
from farmkeys.publish.metadata import (
    CACHE_DURATION,
    VALID_FOR,
    WINDOW,
    Window,
    metadata,
    metadata_of_store,
    metadata_settings,
    render,
    signed_metadata,
    window,
)

__all__ = [
    "CACHE_DURATION",
    "HEALTH_PATH",
    "JWKS_PATH",
    "METADATA_PATH",
    "METRICS_CACHE_SECONDS",
    "METRICS_PATH",
    "RECORD_EVERY_SECONDS",
    "VALID_FOR",
    "WINDOW",
    "Answer",
    "Health",
    "PrimaryKey",
    "Published",
    "PublishedKey",
    "Publisher",
    "Window",
    "etag",
    "from_store",
    "jwks",
    "metadata",
    "metadata_of_store",
    "metadata_settings",
    "primary_key",
    "published",
    "render",
    "signed_metadata",
    "signing_from_store",
    "window",
]
