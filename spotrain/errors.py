"""Errors that reach the user as one line and a non-zero exit."""


class SpotrainError(Exception):
    """Base of every error the CLI turns into a one-line message."""


class SpecError(SpotrainError):
    """A cluster spec that cannot be used: names the file and the key."""


class ClusterNotFound(SpotrainError):
    """No ledger exists for the named cluster."""


class ControllerRunning(SpotrainError):
    """Another controller process already drives this cluster."""


class LedgerTooNew(SpotrainError):
    """A ledger written by a newer spotrain, with a schema this code does not know."""
