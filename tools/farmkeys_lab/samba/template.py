"""The lab's domain, provisioned and seeded once, never run again: copied by LocalSambaDC."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from farmkeys_lab.samba.domain import (
    DOMAIN_DIR_NAME,
    RECORD_NAME,
    SambaError,
    find_samba,
    find_samba_tool,
    missing_samba,
    require_root,
)
from farmkeys_lab.samba.files import write_private
from farmkeys_lab.samba.provision import provision


@dataclass(frozen=True)
class SambaTemplate:
    """A provisioned, seeded domain in ``workdir``, never run again: copied by LocalSambaDC."""

    workdir: Path
    realm: str
    dns_domain: str
    base_dn: str
    domain_sid: str
    admin_dn: str
    admin_password: str = dataclasses.field(repr=False)
    service_dn: str
    service_upn: str
    service_password: str = dataclasses.field(repr=False)
    service_sid: str
    other_dn: str
    other_upn: str
    other_password: str = dataclasses.field(repr=False)
    other_sid: str
    adfs_parent: str
    undelegated_parent: str
    samba_version: str

    @property
    def domain_dir(self) -> Path:
        return self.workdir / DOMAIN_DIR_NAME

    @property
    def record_path(self) -> Path:
        return self.workdir / RECORD_NAME

    @property
    def ca_file(self) -> Path:
        return self.domain_dir / "private" / "tls" / "ca.pem"

    @classmethod
    def load(cls, workdir: Path) -> SambaTemplate:
        """The template an earlier :meth:`provision` left in ``workdir``."""
        workdir = Path(workdir).resolve()
        record: dict[str, str] = json.loads((workdir / RECORD_NAME).read_text(encoding="utf-8"))
        return cls(workdir=workdir, **record)

    @classmethod
    def provision(cls, workdir: Path) -> SambaTemplate:
        """Provision and seed a domain in ``workdir``; an existing template there is reused."""
        workdir = Path(workdir).resolve()
        if (workdir / RECORD_NAME).is_file() and (workdir / DOMAIN_DIR_NAME).is_dir():
            return cls.load(workdir)
        problem = missing_samba()
        if problem is not None:
            raise SambaError(problem)
        require_root("provisioning the lab's Samba domain")
        samba, tool = find_samba(), find_samba_tool()
        assert samba is not None
        assert tool is not None
        template = cls(workdir=workdir, **provision(workdir, samba, tool))
        write_private(template.record_path, json.dumps(template.record(), indent=2).encode())
        return template

    def record(self) -> dict[str, str]:
        """What ``lab.json`` holds: everything but the work directory."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "workdir"}
