"""The HTTP contract: msgspec wire types, their codecs, and the OpenAPI of raw-body routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema

from server.config import Base
from server.events import MAX_ID_CHARS

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
# A user id is a path segment of the read routes, so it may not contain "/" (decoded before
# routing, even as %2F) nor be "." or ".." (clients resolve those segments away before sending):
# such a user could post feedback but never be read back.
USER_ID_PATTERN = r"^(?!\.\.?$)[^/]+$"
UserId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS, pattern=USER_ID_PATTERN)
]


# -- wire types ------------------------------------------------------------------------------
class FeedbackIn(Base):
    """One feedback event as posted to the webhook."""

    event_id: Id
    user_id: UserId
    item_id: Id
    kind: Literal["like", "dislike", "skip", "rating"]
    value: float | None = None
    ts: float | None = None


class FeedbackOut(Base):
    """How many events were new (applied) and how many were repeats (acknowledged only)."""

    accepted: int
    duplicates: int


RESPONSE_ENCODER = msgspec.json.Encoder()


class ScoredItem(Base):
    """One ranked item."""

    item_id: str
    score: float


class RecommendationsOut(Base):
    """A user's top-K."""

    user_id: str
    model_version: str
    items: list[ScoredItem]
    took_ms: float
    fallback: bool


class SimilarOut(Base):
    """Nearest items to an item."""

    item_id: str
    model_version: str
    items: list[ScoredItem]
    took_ms: float


class HistoryEvent(Base):
    """One piece of a user's feedback; event_id and ts are null for dataset rows of the model."""

    event_id: str | None
    item_id: str
    kind: str
    value: float | None
    ts: float | None


class HistoryOut(Base):
    """A user's feedback, newest first."""

    user_id: str
    events: list[HistoryEvent]


class ErrorBody(Base):
    """The one error shape."""

    code: str
    message: str
    detail: dict[str, Any] = msgspec.field(default_factory=dict)


class ErrorOut(Base):
    """Envelope of every 4xx/5xx body."""

    error: ErrorBody


class Status(Base):
    """Liveness/readiness answer."""

    status: str
    model_version: str | None = None
    events_applied: int = 0


class ModelVersion(Base):
    """One artifact version with its offline metrics."""

    version: str
    active: bool
    created_at: str | None
    metrics: dict[str, float]
    # Why it cannot serve, when a listing can tell (an unreadable manifest, missing array
    # files; checksums are verified when it loads): a plain reload would pick it if newest.
    problem: str | None = None


class ModelOut(Base):
    """The active model and the versions available beside it."""

    active: str
    previous: str | None
    versions: list[ModelVersion]


class ReloadIn(Base):
    """Which version to load; the newest when omitted."""

    version: Id | None = None


FEEDBACK_DECODER = msgspec.json.Decoder(FeedbackIn | list[FeedbackIn])


# -- OpenAPI documentation of what the raw-body handlers accept and every error they answer -----
def _text(pattern: str | None = None) -> Schema:
    return Schema(type=OpenAPIType.STRING, min_length=1, max_length=MAX_ID_CHARS, pattern=pattern)


_NUMBER_OR_NULL = Schema(one_of=[Schema(type=OpenAPIType.NUMBER), Schema(type=OpenAPIType.NULL)])
_EVENT = Schema(
    type=OpenAPIType.OBJECT,
    required=["event_id", "user_id", "item_id", "kind"],
    properties={
        "event_id": _text(),
        "user_id": _text(USER_ID_PATTERN),
        "item_id": _text(),
        "kind": Schema(type=OpenAPIType.STRING, enum=["like", "dislike", "skip", "rating"]),
        "value": _NUMBER_OR_NULL,
        "ts": _NUMBER_OR_NULL,
    },
    additional_properties=False,
)
_BODIES: dict[str, Schema] = {
    "feedback": Schema(one_of=[_EVENT, Schema(type=OpenAPIType.ARRAY, items=_EVENT, min_items=1)]),
    "reload": Schema(
        type=OpenAPIType.OBJECT,
        properties={"version": Schema(one_of=[_text(), Schema(type=OpenAPIType.NULL)])},
        additional_properties=False,
    ),
}


@dataclass
class FeedbackOperation(Operation):
    """The feedback route's operation, with the body its handler decodes itself."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            content={"application/json": OpenAPIMediaType(schema=_BODIES["feedback"])},
            required=True,
        )


@dataclass
class ReloadOperation(Operation):
    """The reload route's operation, with its optional body."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            content={"application/json": OpenAPIMediaType(schema=_BODIES["reload"])}
        )


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    return {
        code: ResponseSpec(ErrorOut, generate_examples=False, description="the one error shape")
        for code in codes
    }


READ_ERRORS = _errors(400, 401, 403, 404, 422, 429, 503)
NOT_READY = _errors(503)
WRITE_ERRORS = _errors(400, 401, 403, 404, 409, 413, 422, 429, 503)
RELOAD_DECODER = msgspec.json.Decoder(ReloadIn)
