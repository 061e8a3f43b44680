"""Service configuration: one YAML file, validated by pydantic, built once at start-up.

The ``decision`` and ``models`` sections use exactly the seed's keys
(``shared/seed/gmtrouter-selection.txt``, "Configuration" and "Key Parameters"); ``server``,
``store``, ``sampler``, ``embedding``, ``logging``, ``limits``, ``streaming``, ``prior``,
``scoring``, ``query_evidence``, ``user_evidence``, ``learning`` and ``privacy`` are ours.
Secrets come from the environment: ``NEO4J_USER``, ``NEO4J_PASSWORD`` and ``NEO4J_DATABASE``
override ``store.neo4j.*``; bearer tokens come from ``server.auth.tokens_file`` or env
``GMTROUTER_AUTH_TOKENS`` (``server/security.py``), never from this file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from graphstore.factory import check_store_uri

#: Default location of the embedded database, relative to the working directory.
DEFAULT_STORE_URI = "sqlite:///data/gmtrouter.db"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GMTRouterSettings(_Section):
    """``decision.algorithm.gmtrouter`` — the network (seed "Key Parameters")."""

    num_layers: int = Field(2, ge=1, le=5, description="Number of HGT layers (1-5).")
    hidden_dim: int = Field(64, ge=8, le=1024, description="Hidden dimension size.")
    num_heads: int = Field(4, ge=1, le=16, description="Number of attention heads.")
    learn_preferences: bool = Field(
        True, description="Fine-tune the network online from recorded feedback."
    )
    model_path: str | None = Field(
        None, description="Path to pre-trained weights (a `gmtrouter train` checkpoint)."
    )

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> GMTRouterSettings:
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"hidden_dim (got {self.hidden_dim}) must be divisible by num_heads "
                f"(got {self.num_heads})"
            )
        return self


class AlgorithmSettings(_Section):
    """``decision.algorithm``."""

    type: Literal["gmtrouter"] = "gmtrouter"
    gmtrouter: GMTRouterSettings = GMTRouterSettings()


class DecisionSettings(_Section):
    """``decision``."""

    algorithm: AlgorithmSettings = AlgorithmSettings()


class ModelEntry(_Section):
    """One entry of ``models``: an LLM the gateway can route to."""

    name: str = Field(min_length=1, description="Model name as the gateway sends it.")
    backend: str = Field("", description="Serving backend (informational), e.g. openai.")
    description: str = Field(
        "", description="Text embedded as the LLM node's feature (defaults to the name)."
    )


class TLSSettings(_Section):
    """``server.tls`` — TLS (and mutual TLS) for the gRPC port; off when ``cert_file`` is unset.

    PEM files, read once at start-up (restart to rotate certificates).
    """

    cert_file: str | None = Field(
        None, description="PEM server certificate chain; setting it turns TLS on."
    )
    key_file: str | None = Field(None, description="PEM private key of the server certificate.")
    client_ca_file: str | None = Field(
        None, description="PEM CA bundle that verifies client certificates (mutual TLS)."
    )
    require_client_auth: bool = Field(
        False, description="Refuse clients without a certificate signed by client_ca_file."
    )

    @property
    def enabled(self) -> bool:
        """True when TLS is configured."""
        return self.cert_file is not None

    @model_validator(mode="after")
    def _complete(self) -> TLSSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file needs cert_file and key_file (TLS) as well")
        if self.require_client_auth and self.client_ca_file is None:
            raise ValueError("require_client_auth needs client_ca_file")
        return self


class AuthSettings(_Section):
    """``server.auth`` — bearer-token authentication; on when any token is configured.

    Tokens come from ``tokens_file`` and from env ``GMTROUTER_AUTH_TOKENS`` (comma-separated);
    never from this file itself. Health checks and reflection stay open.
    """

    tokens_file: str | None = Field(
        None,
        description="File with one token per line (optionally followed by scopes, e.g. "
        "'TOKEN route,admin'); '#' starts a comment.",
    )


class ServerSettings(_Section):
    """``server`` — the gRPC listener."""

    host: str = Field("127.0.0.1", description="Listen address.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free one).")
    grace_period_s: float = Field(
        10.0, ge=0, le=300, description="SIGTERM: seconds in-flight calls may take to finish."
    )
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        le=120,
        description="SIGTERM: seconds to keep answering calls while health reports "
        "NOT_SERVING, before the grace period starts (so that a load balancer, e.g. "
        "Kubernetes endpoints, stops sending new calls first).",
    )
    max_connection_age_s: float = Field(
        0.0,
        ge=0,
        le=86400,
        description="Send each client connection an HTTP/2 GOAWAY after this many seconds, so "
        "that clients start new calls on a new connection and spread over replicas added "
        "since; calls and preference streams in flight run on until they end (0 = never; "
        "else at least 1).",
    )

    @field_validator("max_connection_age_s")
    @classmethod
    def _connection_age(cls, age: float) -> float:
        if 0 < age < 1:
            raise ValueError(f"must be 0 (never) or at least 1 second, got {age:g}")
        return age

    max_workers: int = Field(
        1, ge=1, le=8, description="Threads for torch work (the HGT encode, text embedding)."
    )
    metrics_port: int = Field(
        9090,
        ge=0,
        le=65535,
        description="Prometheus /metrics HTTP port on server.host (0 = no metrics endpoint).",
    )
    max_inflight: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="Unary RPCs handled at once; more get RESOURCE_EXHAUSTED (0 = no bound).",
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description="The serving process's event loop: uvloop (less CPU per call; where it is "
        "not installed, e.g. on Windows, asyncio's own with a warning) or asyncio's own.",
    )
    tls: TLSSettings = TLSSettings()
    auth: AuthSettings = AuthSettings()


class Neo4jSettings(_Section):
    """``store.neo4j`` — credentials; NEO4J_USER, NEO4J_PASSWORD, NEO4J_DATABASE override them."""

    user: str = "neo4j"
    password: SecretStr = SecretStr("")
    database: str = "neo4j"


class StoreSettings(_Section):
    """``store`` — where the interaction graph lives."""

    uri: str = Field(
        DEFAULT_STORE_URI,
        description="sqlite:///PATH (embedded, default), or neo4j:// / bolt:// / neo4j+s://.",
    )
    neo4j: Neo4jSettings = Neo4jSettings()

    @field_validator("uri")
    @classmethod
    def _known_store(cls, uri: str) -> str:
        return check_store_uri(uri)

    connect_timeout_s: float = Field(
        2.0, gt=0, le=120, description="Neo4j: TCP connect timeout per attempt, in seconds."
    )
    acquire_timeout_s: float = Field(
        5.0,
        gt=0,
        le=600,
        description="Neo4j: longest wait for a pooled connection (connecting included), in "
        "seconds; then the call fails UNAVAILABLE.",
    )
    retry_time_s: float = Field(
        2.0,
        ge=0,
        le=300,
        description="Neo4j: how long a transaction is retried on transient errors (store "
        "unreachable, deadlock, lost leader), in seconds; then the call fails UNAVAILABLE.",
    )
    open_wait_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="Start-up: how long to keep retrying a store that cannot be opened (e.g. "
        "Neo4j still starting), in seconds; 0 = one attempt, then exit.",
    )
    select_timeout_ms: float = Field(
        500.0,
        gt=0,
        le=60000,
        description="Select: longest wait for each graph-store read, in ms; a slower or "
        "failing store makes Select answer degraded from the last Bradley-Terry prior fit.",
    )


class SamplerSettings(_Section):
    """``sampler`` — the user's k-hop neighbourhood fed to the network."""

    hops: int = Field(2, ge=1, le=4, description="k of the k-hop neighbourhood (1-4).")
    fan_out: list[int] = Field(
        [256, 8, 0, 8],
        min_length=3,
        max_length=4,
        description="Neighbours taken per node at each distance (newest first): fan_out[0] "
        "= the user's newest turns; fan_out[2] = other users' turns per LLM (0 by default: "
        "the network is trained on per-user components and does not use them).",
    )
    min_history: int = Field(
        1, ge=0, le=10000, description="Turns a user needs before routing is personalized."
    )
    version_max_age_ms: float = Field(
        250,
        ge=0,
        le=60000,
        description="How long a user's graph version read from the store is reused before "
        "Select reads it again: writes through other replicas reach this one's Select within "
        "this bound; writes through this replica at once. 0 = read on every Select.",
    )
    state_max_age_s: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="Longest reuse of a user's cached network state (the user's and the "
        "LLMs' embeddings) at an unchanged graph version, in seconds. Bounds how long a "
        "replica can serve state built from data that DeleteUser erased through another "
        "replica when the user has since written as many new interactions (the version is "
        "then the same again).",
    )


class EmbeddingSettings(_Section):
    """``embedding`` — the query text encoder."""

    model: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2", description="sentence-transformers model."
    )
    dim: int = Field(384, ge=8, le=8192, description="Embedding dimension D.")
    device: str = Field("cpu", description="torch device.")
    backend: Literal["onnx", "torch"] = Field(
        "onnx",
        description=(
            "Encoder runtime: onnx = ONNX Runtime on the CPU (graph exported once from the"
            " packaged weights, cached under $GMTROUTER_ONNX_DIR or ~/.cache/gmtrouter/onnx;"
            " falls back to torch with a warning when that fails); torch = sentence-transformers"
            " on torch. A device other than cpu always uses torch."
        ),
    )
    threads: int = Field(
        0,
        ge=0,
        le=64,
        description=(
            "ONNX Runtime intra-op threads for one query's embedding (0 = auto: the CPUs this"
            " process may use, from its affinity and its cgroup CPU quota, at most 4). The"
            " threads sleep between runs instead of spinning, so they leave the cores to the"
            " event loop; the torch backend ignores this (torch runs one thread)."
        ),
    )


class LoggingSettings(_Section):
    """``logging``."""

    format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto = console on a terminal, JSON otherwise."
    )
    level: Literal["debug", "info", "warning", "error"] = "info"


class LimitSettings(_Section):
    """``limits`` — request validation bounds."""

    max_candidates: int = Field(64, ge=1, le=4096)
    max_query_chars: int = Field(
        32768,
        ge=1,
        description="Query text the server embeds. With a client-supplied embedding Select "
        "only hashes the text (any length) and RecordResponse stores up to "
        "max_response_chars.",
    )
    max_response_chars: int = Field(262144, ge=1, description="RecordResponse's response text.")
    # Neo4j indexes ids and model names, alone or in pairs (user_id, session_id): an index
    # key holds at most 8,167 bytes, so 1,000 characters of up to 4 UTF-8 bytes fit twice.
    max_user_id_chars: int = Field(256, ge=1, le=1000)
    max_id_chars: int = Field(
        256,
        ge=1,
        le=1000,
        description="session_id, interaction_id, idempotency_key and model names.",
    )
    max_history_messages: int = Field(256, ge=0)
    max_stream_users: int = Field(
        1000,
        ge=1,
        le=100000,
        description="StreamPreferences: user ids of one stream (each is polled every "
        "streaming.poll_interval_s).",
    )


class StreamingSettings(_Section):
    """``streaming`` — StreamPreferences."""

    poll_interval_s: float = Field(
        0.5, gt=0, le=60, description="How often subscribed users' versions are checked."
    )


class PriorSettings(_Section):
    """``prior`` — the non-personalized Bradley–Terry prior."""

    refresh_s: float = Field(
        1.0, ge=0, le=3600, description="Max age of the cached strengths (shared store)."
    )
    prior_strength: float = Field(
        1.0, ge=0, le=1000, description="Virtual games per model (shrinkage)."
    )


class ScoringSettings(_Section):
    """``scoring`` — how the network's output becomes a candidate's score
    (``server/personalization.py``)."""

    combine: Literal["residual", "network"] = Field(
        "residual",
        description="residual = Bradley-Terry prior + residual_weight x (the network's score "
        "for this user - its score for a user without history): the network supplies only "
        "the personalization; network = the network's logits as they are (the paper's).",
    )
    residual_weight: float = Field(
        0.5, ge=0, le=100, description="Multiplier of the network's personalization residual."
    )


class QueryEvidenceSettings(_Section):
    """``query_evidence`` — every user's outcomes on the same query (server/query_evidence.py)."""

    enabled: bool = Field(
        True,
        description="Add to each candidate's score how its per-query Bradley-Terry strength "
        "(over every user's comparisons of the same query text) deviates from its global one.",
    )
    prior_strength: float = Field(
        10.0,
        gt=0,
        le=1000,
        description="Virtual games per model pulling the per-query strengths to the global ones.",
    )
    weight: float = Field(
        1.0, ge=0, le=100, description="Multiplier of the deviation added to the scores."
    )
    max_comparisons: int = Field(
        1000, ge=1, le=1_000_000, description="Most recent comparisons of one query read."
    )
    max_age_ms: float = Field(
        1000.0,
        ge=0,
        le=3_600_000,
        description="Reuse a query's counts this long (ms); 0 = read the store every Select. "
        "A write through this replica is seen at once, one through another within this bound.",
    )


class UserEvidenceSettings(_Section):
    """``user_evidence`` — the user's own earlier outcomes, overall and on the same query
    (server/user_evidence.py)."""

    enabled: bool = Field(
        True,
        description="Add to each candidate's score how the user's own Bradley-Terry strengths "
        "(over the user's comparisons, and over those of the same query text) deviate from "
        "the global and the per-query ones.",
    )
    max_comparisons: int = Field(
        256, ge=1, le=10_000, description="Most recent comparisons of the user read."
    )
    user_weight: float = Field(
        0.0,
        ge=0,
        le=100,
        description="Multiplier of the user's overall taste (their strengths minus the global "
        "ones); 0 = only their verdicts on the same query count (on the replays of LLMFAO "
        "and MT-Bench the network's residual already carries the taste: README -> Results).",
    )
    user_prior_strength: float = Field(
        5.0,
        gt=0,
        le=1000,
        description="Virtual games per model pulling the user's strengths to the global ones.",
    )
    query_prior_strength: float = Field(
        3.0,
        gt=0,
        le=1000,
        description="Virtual games per model pulling the user's strengths on one query to "
        "that query's strengths (every user's outcomes on it).",
    )
    max_age_ms: float = Field(
        1000.0,
        ge=0,
        le=3_600_000,
        description="Reuse a user's comparisons this long (ms); 0 = read the store every "
        "Select. A write through this replica is seen at once, one through another within "
        "this bound.",
    )


class LearningSettings(_Section):
    """``learning`` — online fine-tuning, on when ``decision.algorithm.gmtrouter.learn_preferences``
    is true and a checkpoint is served (``server/learning.py`` has the exact behaviour)."""

    role: Literal["auto", "trainer", "follower"] = Field(
        "auto",
        description="auto = replicas elect one trainer by a lease in the store; trainer = this "
        "replica trains (configure exactly one); follower = never trains, only loads weights.",
    )
    check_interval_s: float = Field(
        30.0, gt=0, le=86400, description="How often the trainer looks for new feedback."
    )
    min_new_interactions: int = Field(
        200, ge=1, description="New interactions (all users) needed before a round runs."
    )
    window: int = Field(
        5000, ge=10, le=1_000_000, description="Most recent comparisons a round trains on."
    )
    time_budget_s: float = Field(
        60.0, gt=0, le=3600, description="Wall-clock budget of one round's training (seconds)."
    )
    steps: int = Field(60, ge=1, le=100_000, description="Optimizer steps per round at most.")
    lr: float = Field(5e-4, gt=0, le=1, description="Adam learning rate of fine-tuning.")
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of each user's sessions held back to accept/reject."
    )
    min_improvement: float = Field(
        0.0, ge=0, description="Accept only if held-back log-loss drops by more than this (nats)."
    )
    poll_interval_s: float = Field(
        5.0, gt=0, le=3600, description="How often every replica checks for newer weights."
    )
    lease_ttl_s: float = Field(
        180.0,
        gt=0,
        le=86400,
        description="Trainer lease lifetime (role auto); renewed at each check and before "
        "publishing; must exceed check_interval_s + time_budget_s.",
    )

    @model_validator(mode="after")
    def _lease_outlives_a_round(self) -> LearningSettings:
        if self.role == "auto" and self.lease_ttl_s <= self.check_interval_s + self.time_budget_s:
            raise ValueError(
                f"lease_ttl_s (got {self.lease_ttl_s}) must exceed check_interval_s + "
                f"time_budget_s (got {self.check_interval_s} + {self.time_budget_s}), or the "
                f"trainer's lease can expire during a round"
            )
        return self


class PrivacySettings(_Section):
    """``privacy`` — what the service keeps of the users' texts."""

    store_raw_text: bool = Field(
        True,
        description="Store query and response texts. false: store 'sha256:<64 hex>' of each "
        "text instead (identical texts stay linkable); the query embedding is still computed "
        "from the text before it is dropped, so routing works the same.",
    )


class Settings(_Section):
    """The whole configuration file."""

    decision: DecisionSettings = DecisionSettings()
    models: list[ModelEntry] = Field(default_factory=list)
    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    sampler: SamplerSettings = SamplerSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    logging: LoggingSettings = LoggingSettings()
    limits: LimitSettings = LimitSettings()
    streaming: StreamingSettings = StreamingSettings()
    prior: PriorSettings = PriorSettings()
    scoring: ScoringSettings = ScoringSettings()
    query_evidence: QueryEvidenceSettings = QueryEvidenceSettings()
    user_evidence: UserEvidenceSettings = UserEvidenceSettings()
    learning: LearningSettings = LearningSettings()
    privacy: PrivacySettings = PrivacySettings()

    @property
    def gmtrouter(self) -> GMTRouterSettings:
        """Shortcut for ``decision.algorithm.gmtrouter``."""
        return self.decision.algorithm.gmtrouter


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid; the message names the key."""


def _allowed(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """The allowed range of the field at ``loc``, e.g. "allowed: 1-5", or ""."""
    current: Any = model
    info = None
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return ""
        info = current.model_fields.get(str(part))
        if info is None:
            return ""
        current = info.annotation
        args = getattr(current, "__args__", ())
        for a in args:
            if isinstance(a, type) and issubclass(a, BaseModel):
                current = a
    if info is None:
        return ""
    lo = hi = None
    for m in info.metadata:
        if isinstance(m, annotated_types.Ge | annotated_types.Gt):
            lo = getattr(m, "ge", getattr(m, "gt", None))
        if isinstance(m, annotated_types.Le | annotated_types.Lt):
            hi = getattr(m, "le", getattr(m, "lt", None))
    if lo is not None and hi is not None:
        return f"; allowed: {lo}-{hi}"
    if lo is not None:
        return f"; allowed: >= {lo}"
    if hi is not None:
        return f"; allowed: <= {hi}"
    return ""


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        got = f" (got {err['input']!r})" if err["type"] not in ("missing", "value_error") else ""
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
            continue
        msg = str(err["msg"]).removeprefix("Value error, ")  # pydantic's prefix of a ValueError
        lines.append(f"  {key}: {msg}{got}{_allowed(Settings, loc)}")
    return "\n".join(lines)


def parse_settings(data: Mapping[str, Any] | None, source: str = "<config>") -> Settings:
    """Validate a configuration mapping.

    Raises:
        ConfigError: a key is unknown or a value is out of range; the message names the key
            (e.g. ``decision.algorithm.gmtrouter.num_layers``) and the allowed range.
    """
    try:
        return Settings.model_validate(dict(data or {}))
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None


def load_settings(
    path: str | Path | None = None,
    *,
    store_uri: str | None = None,
    port: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read the YAML file (defaults when ``path`` is None), apply CLI and env overrides.

    Args:
        path: YAML configuration file.
        store_uri: ``--store`` override of ``store.uri``.
        port: ``--port`` override of ``server.port``.
        environ: Environment (``os.environ`` by default): NEO4J_USER, NEO4J_PASSWORD and
            NEO4J_DATABASE override ``store.neo4j``.

    Raises:
        ConfigError: the file is missing, is not YAML, or fails validation.
    """
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {source}: {exc}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration file {source} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {source} must hold a mapping at the top")
        data = loaded or {}
    store = dict(data.get("store") or {})
    neo = dict(store.get("neo4j") or {})
    for key, var in (
        ("user", "NEO4J_USER"),
        ("password", "NEO4J_PASSWORD"),
        ("database", "NEO4J_DATABASE"),
    ):
        if env.get(var):
            neo[key] = env[var]
    if neo:
        store["neo4j"] = neo
    if store_uri is not None:
        store["uri"] = store_uri
    if store:
        data["store"] = store
    if port is not None:
        data["server"] = {**dict(data.get("server") or {}), "port": port}
    return parse_settings(data, source)
