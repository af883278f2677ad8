"""Every tunable of signedrec in one msgspec tree, loaded from TOML and ``SIGNEDREC_*`` env vars."""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import msgspec

from server.errors import ConfigError

log = logging.getLogger("signedrec.config")


class Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Shared flags for every config and wire struct: unknown fields are errors, not silence."""


# Model hyper-parameters and training weights must be finite (NaN fails the solvers, inf the
# grids' comparisons); the bound is far beyond any useful value.
MAX_MODEL_WEIGHT = 1e6
Weight = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_MODEL_WEIGHT)]
Ridge = Annotated[float, msgspec.Meta(gt=0.0, le=MAX_MODEL_WEIGHT)]
Dropout = Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)]  # 1 would drop every input
Share = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class Hyper(Base):
    """One point of the model's hyper-parameter space (the search's start, or a manifest's)."""

    neg_weight: Weight = 0.5
    l2: Ridge = 4.0  # relative to the mean item degree of the signed input
    dropout: Dropout = 0.25
    gf_rank: Annotated[int, msgspec.Meta(ge=1)] = 64
    gf_ideal: Weight = 1.0
    gf_mix: Weight = 1.0

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for the manifest and progress lines."""
        return msgspec.structs.asdict(self)


class ModelConfig(Base):
    """The signed linear graph model and its automatic hyper-parameter search."""

    dim: Annotated[int, msgspec.Meta(ge=1)] = 256
    # numpy's generators refuse a negative seed, torch.manual_seed one beyond 64 bits (and
    # msgspec bounds stop at int64).
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    selection_metric: Literal["ndcg@20", "recall@20"] = "ndcg@20"
    # Starting point and grids of the coordinate search, identical for every dataset. The ridge
    # penalty is relative to the mean item degree, so one grid fits catalogues of any density.
    start: Hyper = Hyper()
    l2_grid: tuple[Ridge, ...] = (2.0, 8.0, 16.0, 32.0, 1.0)
    dropout_grid: tuple[Dropout, ...] = (0.0, 0.5)
    neg_input_grid: tuple[Weight, ...] = (0.25, 1.0, 0.0)
    gf_mix_grid: tuple[Weight, ...] = (1.0, 2.0, 0.5, 4.0)
    gf_rank_grid: tuple[Annotated[int, msgspec.Meta(ge=1)], ...] = (32, 128, 256)
    gf_ideal_grid: tuple[Weight, ...] = (0.5, 2.0)
    # Stop searching one axis after this many trials in a row without improvement.
    patience: Annotated[int, msgspec.Meta(ge=1)] = 2
    # Dislike suppression strength: the largest of the grid whose valid NDCG@20 stays within
    # this relative tolerance of no suppression is stored in the artifact for serving.
    suppression_grid: tuple[Weight, ...] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
    suppression_tolerance: Share = 0.01
    # ... unless look-alikes of a fresh dislike would not sink: gamma is raised until most
    # (this share) of a fresh dislike's nearest items drop in rank (sampled valid dislikes).
    suppression_sink_rate: Share = 0.5
    suppression_lookalikes: Annotated[int, msgspec.Meta(ge=1)] = 5
    suppression_sample: Annotated[int, msgspec.Meta(ge=1)] = 500
    # Dislike propensity (server/propensity.py): ranking subtracts beta x P(user dislikes item);
    # the largest beta of the grid whose valid NDCG@20 stays within the tolerance of beta 0 (with
    # the chosen suppression) is stored in the artifact. `prior` smooths user and item rates.
    # Tolerance 0: only as much dislike avoidance as costs no valid NDCG (at 1% the served lists
    # fell below the static model in benchmarks.online, amazon-music 0.992x).
    propensity_grid: tuple[Weight, ...] = (0.1, 0.2, 0.3, 0.5, 1.0)
    propensity_tolerance: Share = 0.0
    # Must be > 0: an item or user with no signed feedback would get rate 0/0 (NaN scores).
    propensity_prior: Annotated[float, msgspec.Meta(gt=0.0)] = 16.0


# An event's strength is relative to a like's (1): finite, and of the sign of its kind. A wrong
# sign would turn a dislike into a like (recommendable again), 0 would keep the pair excluded
# online while training drops it, NaN or inf would poison the user's vector.
MAX_EVENT_WEIGHT = 1000.0
Liking = Annotated[float, msgspec.Meta(gt=0.0, le=MAX_EVENT_WEIGHT)]
Disliking = Annotated[float, msgspec.Meta(ge=-MAX_EVENT_WEIGHT, lt=0.0)]


class EventWeights(Base):
    """How a feedback kind maps to a signed weight in the user's fold-in."""

    like: Liking = 1.0
    dislike: Disliking = -1.0
    skip: Disliking = -0.25
    rating_positive: Liking = 1.0
    rating_negative: Disliking = -1.0


# Settings handed to C ints (FAISS, OpenMP, the garbage collector): beyond this they overflow
# there, after the model has loaded, instead of failing as a config error.
C_INT_MAX = 2**31 - 1

# Ranking's penalty weights are in units of the user's best candidate's score (1): beyond this
# a penalty alone decides the order. The bound also keeps out inf, which fails every request.
MAX_RANKING_WEIGHT = 1000.0


class RankingConfig(Base):
    """Candidate retrieval, exclusion and negative suppression."""

    default_k: Annotated[int, msgspec.Meta(ge=1)] = 20  # at most max_k
    max_k: Annotated[int, msgspec.Meta(ge=1)] = 200
    candidate_multiplier: Annotated[int, msgspec.Meta(ge=1)] = 4
    candidate_min: Annotated[int, msgspec.Meta(ge=0)] = 100
    # Extra candidates fetched for the user's seen (excluded) items; a longer history is fetched
    # to its own length in a second search for that user alone.
    exclusion_pad: Annotated[int, msgspec.Meta(ge=0)] = 64
    # None: use the strength validated at training time and stored in the artifact.
    suppression_gamma: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_RANKING_WEIGHT)] | None = None
    # None: use the dislike-propensity weight validated at training time (0 for older artifacts).
    propensity_beta: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_RANKING_WEIGHT)] | None = None
    # How many of the user's latest dislikes the look-alike suppression looks at (0: none).
    suppression_recent: Annotated[int, msgspec.Meta(ge=0, le=C_INT_MAX)] = 50
    exclude_seen: bool = True
    # Users whose finished rankings are memoised until their next event or a model swap (exact:
    # nothing else feeds a user's ranking); 0 turns the memo off.
    cache_users: Annotated[int, msgspec.Meta(ge=0)] = 20_000
    # (k, include_liked) variants kept per user, oldest dropped first; each ranking is stored
    # packed (8 bytes an item plus ~130 bytes with its key), so the memo holds at most
    # cache_users * cache_variants_per_user * (8 * max_k + 130) bytes: ~280 MB at the defaults.
    cache_variants_per_user: Annotated[int, msgspec.Meta(ge=1)] = 8

    def __post_init__(self) -> None:
        # msgspec reports a ValueError here as a validation error at `$.ranking`.
        if self.default_k > self.max_k:
            raise ValueError(
                f"ranking.default_k ({self.default_k}) must not exceed ranking.max_k ({self.max_k})"
            )


class IndexConfig(Base):
    """FAISS index kind and device."""

    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    device: Literal["auto", "cpu", "gpu"] = "auto"
    ivf_nlist: Annotated[int, msgspec.Meta(ge=1, le=C_INT_MAX)] = 256
    ivf_nprobe: Annotated[int, msgspec.Meta(ge=1, le=C_INT_MAX)] = 16
    # HNSW's level factor is 1 / ln(m).
    hnsw_m: Annotated[int, msgspec.Meta(ge=2, le=C_INT_MAX)] = 32
    hnsw_ef_search: Annotated[int, msgspec.Meta(ge=1, le=C_INT_MAX)] = 128
    # OpenMP threads FAISS may use for CPU searches; 0 keeps FAISS's default (one per core).
    # The server's micro-batches are small, and idle OpenMP workers spin-wait on the cores the
    # event loop needs: at 1500 req/s on 2 cores one thread cut server CPU from 129% to 80%.
    cpu_threads: Annotated[int, msgspec.Meta(ge=0, le=C_INT_MAX)] = 1
    # faiss-gpu answers at most this many neighbours per search (its GPU_MAX_SELECTION_K); a
    # deeper search (a user with a long history) runs on the index's CPU copy instead.
    gpu_max_k: Annotated[int, msgspec.Meta(ge=1, le=C_INT_MAX)] = 2048


class KernelConfig(Base):
    """Which numba backend runs the hot path ("auto": the CPU kernels, faster at serving sizes
    even beside a GPU; "cuda" forces the GPU kernels)."""

    backend: Literal["auto", "cpu", "cuda"] = "auto"
    # A user's vector is a running float32 sum of in-place updates; after this many it is
    # refolded from the user's feedback, so rounding never accumulates past a refold's worth.
    refold_every: Annotated[int, msgspec.Meta(ge=1)] = 4096


# The size of an event-log record's header (server/events.py HEADER_SIZE; a test keeps them equal).
SEGMENT_HEADER_BYTES = 20


class EventLogConfig(Base):
    """The durable feedback log."""

    # A segment must hold at least one record: its 20-byte header (events.HEADER_SIZE) and more.
    segment_bytes: Annotated[int, msgspec.Meta(gt=SEGMENT_HEADER_BYTES)] = 64 * 1024 * 1024
    replay_batch: Annotated[int, msgspec.Meta(ge=1)] = 65536
    snapshot_every_events: Annotated[int, msgspec.Meta(ge=1)] = 1_000_000
    # A periodic snapshot copies this many users' feedback (or dedup ids) per event-loop step,
    # and its writer encodes chunks of this many, so requests interleave with both.
    snapshot_step: Annotated[int, msgspec.Meta(ge=1)] = 200
    # The share of the event loop's time a periodic snapshot's copying may take (it idles in
    # proportion after each step, so requests keep their latency; 1 = no idling).
    snapshot_loop_share: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.5
    # After a failed snapshot write (disk full, say) the next try waits this long, doubling
    # with each failure in a row up to the max: each try copies the whole state again.
    snapshot_retry_seconds: Annotated[float, msgspec.Meta(gt=0.0)] = 30.0
    snapshot_retry_max_seconds: Annotated[float, msgspec.Meta(gt=0.0)] = 900.0
    fsync: bool = True
    # Idempotency: a repeated event_id among this many most recent acceptances is acknowledged,
    # not applied; older ids are forgotten so memory stays bounded (~200 bytes per 32-char id).
    dedup_window: Annotated[int, msgspec.Meta(ge=1)] = 1_000_000
    # "trained": once every model version under the artifact root was trained on a log segment
    # (`signedrec train --events`, the manifest's watermark) and it is older than the dedup
    # window, the server deletes it at start and after a reload; a restart on any of those
    # versions, and `train --events --since` the newest, never read it. "all": keep every event.
    retention: Literal["all", "trained"] = "all"

    def __post_init__(self) -> None:
        if self.snapshot_retry_seconds > self.snapshot_retry_max_seconds:
            raise ValueError(
                f"log.snapshot_retry_seconds ({self.snapshot_retry_seconds:g}) must not exceed "
                f"log.snapshot_retry_max_seconds ({self.snapshot_retry_max_seconds:g})"
            )


HttpFront = Literal["uvicorn", "granian"]
HTTP_FRONTS: tuple[str, ...] = get_args(HttpFront)


PORT_MIN, PORT_MAX = 0, 65535


class ServerConfig(Base):
    """HTTP limits and addresses."""

    # Not empty (that would bind every interface, 0.0.0.0, never what was meant) nor blank.
    host: Annotated[str, msgspec.Meta(min_length=1, pattern=r"^\S+$")] = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=PORT_MIN, le=PORT_MAX)] = 8000  # 0: any free port
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1)] = 1024 * 1024
    max_events_per_batch: Annotated[int, msgspec.Meta(ge=1)] = 5000
    history_default_limit: Annotated[int, msgspec.Meta(ge=1)] = 100  # at most history_max_limit
    # Also how many of a user's logged events a version trained on the log keeps for histories.
    history_max_limit: Annotated[int, msgspec.Meta(ge=1)] = 5000
    state_dir: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # The HTTP front. uvicorn parses HTTP on the event loop's thread; granian (embedded, same
    # process) parses it on its own Rust threads and hands the loop only the ASGI calls: the
    # loop thread, which bounds throughput, then spends ~35% less per request (loadtest on the
    # H100 machine: 5000 req/s holds under granian, not under uvicorn). uvicorn stays the default
    # because granian's embedded mode is marked experimental upstream.
    http: HttpFront = "uvicorn"
    http_threads: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2  # granian's Rust I/O threads
    # Garbage collector: once loaded, the state's containers are frozen out of collections, and
    # the youngest generation is collected every this many net allocations (CPython: 700),
    # because each request allocates hundreds of short-lived framework objects.
    gc_freeze_after_load: bool = True
    gc_threshold0: Annotated[int, msgspec.Meta(ge=0, le=C_INT_MAX)] = 20_000
    # Loading builds millions of acyclic containers (users' feedback, histories) and the cyclic
    # collector would scan the growing heap over and over: off while loading, one collection at
    # the end (1M events in-process: apply 4.4 -> 3.3 s).
    gc_off_while_loading: bool = True
    # In-flight requests get this long after SIGTERM before the front closes their connections.
    graceful_shutdown_s: Annotated[int, msgspec.Meta(ge=1, le=600)] = 5
    # Pending connections the kernel queues; uvicorn's default. (Embedded granian's is 128: with
    # 200 clients connecting at once a third of them stalled for a whole 30 s load step.)
    listen_backlog: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 2048
    # Recommendation requests of one event-loop tick ranked together (one FAISS search, one
    # kernel call); a fuller tick is ranked at once in more than one batch.
    recommend_batch: Annotated[int, msgspec.Meta(ge=1)] = 256
    # uvicorn front (granian bounds these itself): a client has this long from a request's first
    # byte to its last (else 408, or a dropped upload), and a connection this many pipelined
    # requests queued behind the one running (else it is closed): slow or greedy clients would
    # otherwise hold file descriptors and memory without bound.
    request_read_timeout_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 60
    max_pipelined: Annotated[int, msgspec.Meta(ge=1)] = 64

    def __post_init__(self) -> None:
        # msgspec reports a ValueError here as a validation error at `$.server`.
        if self.state_dir and not self.state_dir.strip():  # "" is unset; "  " is a typo
            raise ValueError("server.state_dir must not be blank (leave it unset for the default)")
        if self.history_default_limit > self.history_max_limit:
            raise ValueError(
                f"server.history_default_limit ({self.history_default_limit}) must not exceed "
                f"server.history_max_limit ({self.history_max_limit})"
            )


class AccessConfig(Base):
    """API keys, roles and webhook signatures. With no keys configured, access is open."""

    # key -> role; "admin" may do everything, "writer" may post feedback, "reader" may read.
    keys: dict[str, Literal["admin", "writer", "reader"]] = msgspec.field(default_factory=dict)
    read_requires_key: bool = False
    # When set, feedback bodies must be signed: HMAC-SHA256 over "<timestamp>.<body>".
    hmac_secret: str = ""
    hmac_window_s: Annotated[float, msgspec.Meta(ge=0.0)] = 300.0
    # Without keys, a browser's writes are accepted only from the service's own origin (its
    # Host, or X-Forwarded-Host behind a proxy) and from these, e.g. "https://shop.example".
    allowed_origins: list[Annotated[str, msgspec.Meta(pattern=r"^https?://[^/\s]+$")]] = (
        msgspec.field(default_factory=list)
    )

    def __post_init__(self) -> None:
        for key in self.keys:
            # HTTP strips a header value's surrounding whitespace: such a key never matches.
            if not key or key != key.strip():
                raise ValueError(f"access.keys: key {key!r} is empty or has surrounding "
                                 "whitespace, which no request header can carry")  # fmt: skip
        for origin in self.allowed_origins:
            try:
                urlsplit(origin).port  # noqa: B018 - parsing it is the check
            except ValueError as exc:
                raise ValueError(f"`allowed_origins` entry {origin!r}: {exc}") from None


class LimitsConfig(Base):
    """Back-pressure: per-key rate limit and a bound on requests in flight."""

    # Token bucket per API key (or per client address without one); 0 disables it.
    rate_per_s: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    # Every request costs one token and a bucket never holds more than `burst`: below 1, no
    # request would ever pass.
    burst: Annotated[float, msgspec.Meta(ge=1.0)] = 100.0
    max_identities: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    max_inflight: Annotated[int, msgspec.Meta(ge=1)] = 1024  # 0 would shed every request
    retry_after_s: Annotated[int, msgspec.Meta(ge=0)] = 1


class Config(Base):
    """The whole configuration."""

    model: ModelConfig = ModelConfig()
    events: EventWeights = EventWeights()
    ranking: RankingConfig = RankingConfig()
    index: IndexConfig = IndexConfig()
    kernels: KernelConfig = KernelConfig()
    log: EventLogConfig = EventLogConfig()
    server: ServerConfig = ServerConfig()
    access: AccessConfig = AccessConfig()
    limits: LimitsConfig = LimitsConfig()


ENV_PREFIX = "SIGNEDREC_"


def _is_text(info: msgspec.inspect.Type) -> bool:
    """Whether a field of this type takes a plain string (str, string literals, optional)."""
    if isinstance(info, msgspec.inspect.UnionType):
        kinds = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        return bool(kinds) and all(_is_text(t) for t in kinds)
    if isinstance(info, msgspec.inspect.LiteralType):
        return all(isinstance(v, str) for v in info.values)
    return isinstance(info, msgspec.inspect.StrType)


def _text_fields() -> frozenset[tuple[str, str]]:
    """(section, field) of every config field whose value is a string: env text is taken as is."""
    out = set()
    for section in getattr(msgspec.inspect.type_info(Config), "fields", ()):
        for field in getattr(section.type, "fields", ()):
            if _is_text(field.type):
                out.add((section.name, field.name))
    return frozenset(out)


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Turn ``SIGNEDREC_SECTION__FIELD=value`` variables into a nested dict of raw strings."""
    out: dict[str, dict[str, Any]] = {}
    text = _text_fields()
    sections = {f.name: f.type.__struct_fields__ for f in msgspec.structs.fields(Config)}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        if "__" not in key:
            # Other SIGNEDREC_ names exist (the load test's, Kubernetes' service links such as
            # SIGNEDREC_SERVER_PORT for a Service named signedrec-server), so this is only
            # warned: a section and one of its fields joined by one underscore, likely a
            # setting with one underscore too few, which would otherwise be ignored unseen.
            section, _, rest = key[len(ENV_PREFIX) :].lower().partition("_")
            if rest in sections.get(section, ()):
                log.warning("environment variable %s is ignored: a setting is named "
                            "%sSECTION__FIELD (two underscores), e.g. %s%s__%s", key, ENV_PREFIX,
                            ENV_PREFIX, section.upper(), rest.upper())  # fmt: skip
            continue
        section, _, field = key[len(ENV_PREFIX) :].lower().partition("__")
        # Tables and lists (e.g. access keys) come as JSON text; a string field takes the text
        # as it is, even one that starts like JSON (an HMAC secret "[abc", say).
        parsed: Any = value
        if value.startswith(("{", "[")) and (section, field) not in text:
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{key}: not valid JSON: {exc}") from None
        out.setdefault(section, {})[field] = parsed
    return out


def _merge(base: dict[str, Any], extra: dict[str, dict[str, Any]], where: str) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, fields in extra.items():
        table = merged.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(
                f"{where}: `{section}` must be a table ([{section}]), got "
                f"{type(table).__name__} {table!r}"
            )
        table.update(fields)
    return merged


def _read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML config file; every way it can be unusable is a ConfigError naming it."""
    try:
        text = Path(path).read_bytes().decode("utf-8")  # TOML is UTF-8 by definition
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"config file {path} is a directory, not a TOML file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path}: not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from exc
    except OSError as exc:  # permission denied, an I/O error, ...
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load config from an optional TOML file, then apply env overrides; errors name the field."""
    raw: dict[str, Any] = {} if path is None else _read_toml(path)
    where = f"config file {path}" if path else "configuration"
    overrides = _env_overrides(os.environ if env is None else env)
    merged = _merge(raw, overrides, where)
    try:
        # Env values are strings; strict=False lets msgspec parse "8080" into an int field.
        return msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{_source(str(exc), overrides, where)}: {exc}") from exc


def _source(message: str, overrides: Mapping[str, Mapping[str, Any]], where: str) -> str:
    """The environment variable a validation error's field came from, else ``where``."""
    at = re.search(r"at `\$\.(\w+)(?:\.(\w+))?", message)
    unknown = re.search(r"unknown field `(\w+)`", message)
    if at is None:  # at the top level: an unknown section, named by the variable that made it
        fields = overrides.get(unknown.group(1), {}) if unknown else {}
        section, field = (unknown.group(1), next(iter(fields))) if fields else ("", None)
    else:
        section = at.group(1)
        field = unknown.group(1) if unknown and at.group(2) is None else at.group(2)
    if field is not None and field in overrides.get(section, {}):
        return f"environment variable {ENV_PREFIX}{section.upper()}__{field.upper()}"
    named = [f for f in overrides.get(section, {}) if f"{section}.{f} " in message]
    if field is None and named:
        # A check across a section's fields (default_k against max_k): the file alone may not
        # hold any of them, so the variables its message names are named beside it.
        names = ", ".join(f"{ENV_PREFIX}{section.upper()}__{f.upper()}" for f in named)
        return f"{where} with environment variables {names}"
    return where
