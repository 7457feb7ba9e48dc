"""Settings: a TOML file plus ``FARMKEYS_<SECTION>_<KEY>`` environment overrides.

:func:`load` reads them (:mod:`~farmkeys.config.loader`), builds the frozen
sections of :mod:`~farmkeys.config.model` and checks every value
(:mod:`~farmkeys.config.validate`), at start, so a bad value fails before any
server is touched. What callers use is re-exported here.
"""

from __future__ import annotations

from farmkeys.config.loader import ENV_CONFIG, ENV_PREFIX, load
from farmkeys.config.model import (
    MAX_FARM_NAME,
    Config,
    DatabaseConfig,
    DirectoryConfig,
    FarmConfig,
    HooksConfig,
    LeaseConfig,
    MasterKeyConfig,
    NodeConfig,
    PolicyConfig,
    PublishConfig,
    RelyingParty,
    RetryConfig,
    StatusConfig,
)

__all__ = [
    "ENV_CONFIG",
    "ENV_PREFIX",
    "MAX_FARM_NAME",
    "Config",
    "DatabaseConfig",
    "DirectoryConfig",
    "FarmConfig",
    "HooksConfig",
    "LeaseConfig",
    "MasterKeyConfig",
    "NodeConfig",
    "PolicyConfig",
    "PublishConfig",
    "RelyingParty",
    "RetryConfig",
    "StatusConfig",
    "load",
]
