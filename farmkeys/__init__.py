"""farmkeys: token-signing and token-decryption certificates for a federation farm."""

__version__ = "0.1.0"
