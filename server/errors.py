"""Domain exceptions: each carries a machine-readable code and detail, and knows nothing of HTTP."""

from __future__ import annotations

from typing import Any


class SignedrecError(Exception):
    """Base of every expected failure; ``code`` is stable and machine-readable."""

    code: str = "error"

    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail: dict[str, Any] = detail or {}


class ConfigError(SignedrecError):
    """The configuration file or environment is invalid."""

    code = "invalid_config"


class DataError(SignedrecError):
    """An input data file is malformed; detail names file, line and problem."""

    code = "invalid_data"

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {problem}", {"file": path, "line": line, "problem": problem})


class ArtifactError(SignedrecError):
    """An artifact is missing, corrupt, partial or of an incompatible schema."""

    code = "invalid_artifact"


class StateMismatchError(ArtifactError):
    """A sound version that cannot serve this state dir: another item catalogue, trained on
    another log (or more of it), or needing events log retention dropped."""


class UnknownItemError(SignedrecError):
    """An item id that the loaded model does not know."""

    code = "unknown_item"


class UnknownUserError(SignedrecError):
    """A user id with no feedback and no trained history."""

    code = "unknown_user"


class InvalidEventError(SignedrecError):
    """A feedback event that is well-formed JSON but semantically invalid."""

    code = "invalid_event"


class MalformedJsonError(SignedrecError):
    """A request body that is not JSON."""

    code = "malformed_json"


class SchemaError(SignedrecError):
    """A request body that is JSON but violates the schema."""

    code = "invalid_body"


class IncompleteBodyError(SignedrecError):
    """A request body that ended before it was complete (the client went away, bad framing)."""

    code = "incomplete_body"


class BodyTooLargeError(SignedrecError):
    """A request body beyond the configured size."""

    code = "body_too_large"


class InvalidRequestError(SignedrecError):
    """A request parameter out of its allowed range."""

    code = "invalid_request"


class LogUnavailableError(SignedrecError):
    """The event log cannot be written (disk full, unwritable); writes are refused, reads go on."""

    code = "log_unavailable"


class LogCorruptError(SignedrecError):
    """The event log has a corrupt record before its tail, which replay cannot skip safely."""

    code = "log_corrupt"


class NotReadyError(SignedrecError):
    """The service is still loading its artifact or replaying its log."""

    code = "not_ready"


class UnauthenticatedError(SignedrecError):
    """No valid credential (API key or webhook signature) was presented."""

    code = "unauthenticated"


class ForbiddenError(SignedrecError):
    """The credential is valid but its role may not do this."""

    code = "forbidden"


class RateLimitedError(SignedrecError):
    """Too many requests for this key; retry after ``detail['retry_after_s']`` seconds."""

    code = "rate_limited"


class OverloadedError(SignedrecError):
    """Too many requests in flight; writes are shed quickly instead of queueing."""

    code = "overloaded"


class NoPreviousVersionError(SignedrecError):
    """Rollback asked for with nothing to roll back to."""

    code = "no_previous_version"


class UnknownVersionError(SignedrecError):
    """A model version that is not (or no longer) under the artifact root."""

    code = "unknown_version"


class RolloutNotSavedError(SignedrecError):
    """A reload or rollback whose choice could not be persisted (disk full): refused, so a
    restart never serves another version than the one the operator was told is active."""

    code = "rollout_not_saved"


class LoadStopped(Exception):
    """Loading gave way to a shutdown that arrived meanwhile: not a failure, and nothing to
    save (no event is accepted before loading ends, and the log replays again next start)."""
