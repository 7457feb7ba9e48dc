"""The pure codecs: every byte layout farmkeys reads or writes, with no I/O and no clock.

Each module holds one format: the native sealed blob (:mod:`.blob`) and the bundle it
seals (:mod:`.bundle`), keys and certificates (:mod:`.certificates`), the authenticated
farm state record (:mod:`.farm_state`), operator requests (:mod:`.request`), relying-party
fetch records (:mod:`.fetch_record`), escrow files (:mod:`.escrow_file`), AD FS's
``EncryptedPfx`` (:mod:`.adfs_pfx`, read only) and the signed XML of the federation
metadata (:mod:`.signed_xml`). docs/blob-format.md writes them down.

They import only :mod:`farmkeys.errors`, :mod:`farmkeys.vocab`, one another, the standard
library and cryptography; time, keys and rows are passed in. Nothing is imported here, so
that a caller loads only the codecs it uses (a sync with nothing to do loads no
cryptography).
"""
