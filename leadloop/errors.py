"""One exception taxonomy for leadloop, grouped by the phase that raises it.

The CLI turns any `LeadloopError` into one `Error: ...` line (plus its hint) and an exit code;
anything else is a bug and keeps its traceback. Messages name the record or config key and
never carry secrets or clear PII.
"""

from __future__ import annotations

from collections.abc import Sequence


class LeadloopError(Exception):
    """Root of every error leadloop raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


# --- Configuration -------------------------------------------------------------------------


class ConfigError(LeadloopError):
    """One problem in the configuration, naming its key path (e.g. `crm.token_env`)."""

    exit_code = 2

    def __init__(self, key: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"config key {key}: {message}", hint=hint)
        self.key = key


class ConfigErrors(LeadloopError):
    """Every problem found in a configuration file at once."""

    exit_code = 2

    def __init__(self, path: str, errors: Sequence[ConfigError]) -> None:
        self.path = path
        self.errors = list(errors)
        lines = "\n".join(e.message for e in self.errors)
        super().__init__(f"invalid config {path}:\n{lines}")


class MissingSecretError(ConfigError):
    """A secret's environment variable, named in the config, is not set."""

    def __init__(self, key: str, env_var: str) -> None:
        super().__init__(
            key,
            f"environment variable {env_var} is not set",
            hint=f"export {env_var}=... before running leadloop (secrets never go in the file)",
        )
        self.env_var = env_var


# --- Sources (CRM) and destinations (ad platforms) ----------------------------------------


class SourceError(LeadloopError):
    """The CRM could not be read."""


class RetriableSourceError(SourceError):
    """A transient CRM failure (429, 5xx, connection); the sync may be tried again."""


class FatalSourceError(SourceError):
    """A CRM failure that retrying will not fix (auth, bad request, quota exhausted)."""


class QuotaExhaustedError(FatalSourceError):
    """A daily API quota is used up; the message says when the sync can resume."""


class DestinationError(LeadloopError):
    """An ad platform could not be reached or refused a whole request."""


class RetriableDestinationError(DestinationError):
    """A transient platform failure; the batch is retried later."""


class FatalDestinationError(DestinationError):
    """A platform failure that retrying will not fix (auth, bad configuration)."""


# --- Records -------------------------------------------------------------------------------


class RecordRejected(LeadloopError):
    """Skippable: one record is bad. It is stored with its reason; the batch goes on."""

    def __init__(self, record_ref: str, reason: str, payload: dict | None = None) -> None:
        super().__init__(f"record {record_ref}: {reason}")
        self.record_ref = record_ref
        self.reason = reason
        self.payload = payload or {}


# --- Model ---------------------------------------------------------------------------------


class ModelError(LeadloopError):
    """A model is missing, unfitted, incompatible, or there is not enough data to train one."""


class LeakageError(ModelError):
    """A feature would be known only after the moment being predicted."""


# --- Operation -----------------------------------------------------------------------------


class LeaseHeldError(LeadloopError):
    """Another daemon holds the single-instance lease on this database."""
