"""The ledger's exceptions, shared by every module of the package."""

from __future__ import annotations


class LedgerError(RuntimeError):
    """The ledger cannot do what was asked (bad append, missing file, inconsistent state)."""


class RecordError(ValueError):
    """A record's fields or bytes are not a valid canonical record."""


class OperatorKeyError(LedgerError):
    """The operator's key file is missing, malformed or readable by others."""

