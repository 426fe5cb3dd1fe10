"""The admin API's request and response bodies, as pydantic models.

Handlers build every JSON answer through these models and the OpenAPI document is generated
from them, so what the document says is what the endpoints do. Requests forbid unknown keys;
responses allow extra keys (a newer gateway may say more).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from gateway.settings import PolicySettings
from trainer.progress import JobStatus

Backend = Literal["cloud", "local", "failover"]
Mode = Literal["cloud", "training", "eval", "local"]
RecordKind = Literal["user", "judge", "shadow"]


def _whole_number(value: Any) -> Any:
    # JSON Schema counts 3.0 as an integer; strict validation would not.
    return int(value) if isinstance(value, float) and value.is_integer() else value


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_serialization_defaults_required=True)


# --- requests ---------------------------------------------------------------------------


class ModeRequest(_Request):
    """Pin the route to the cloud or the local model, or hand it back to the adaptive cycle."""

    mode: Literal["cloud", "local", "auto"]


class AdapterRequest(_Request):
    """Serve this adapter version (roll back or forward)."""

    version: WholeNumber = Field(ge=1, le=1_000_000)


# --- errors -----------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, used by every failing admin call."""

    error: ErrorDetail


# --- logs -------------------------------------------------------------------------------


class LogRecordOut(_Response):
    """One request through the gateway. `request`/`response`/`usage` are the JSON bodies
    (a stream assembled into the non-stream shape); text when a body was not JSON."""

    id: int
    request_id: str
    ts: str = Field(description="ISO 8601, UTC")
    route: str
    backend: str
    endpoint: str
    method: str
    status: int
    outcome: str
    stream: bool
    model: str | None = None
    upstream_model: str | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    request: Any = None
    response: Any = None
    usage: Any = None
    error: str | None = None
    client: str | None = None
    kind: str


class LogPage(_Response):
    data: list[LogRecordOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page")


class DerivedDeletion(_Response):
    """Copies of the deleted prompts removed elsewhere (counts only, never the content)."""

    own_calls: int = Field(ge=0, description="the gateway's judge/shadow calls about them")
    evals: int = Field(ge=0, description="eval verdicts on them")
    adapter_lines: dict[str, int] = Field(description="lines removed per data split file name")
    job_lines: int = Field(ge=0, description="lines of training jobs' files and logs")
    adapters_trained_on_deleted: list[dict[str, Any]] = Field(
        description="adapter versions trained on a removed pair, now marked so in meta.json"
    )


class DeleteResult(_Response):
    deleted: int = Field(ge=0)
    derived: DerivedDeletion | None = None
    retrain_jobs: dict[str, str] = Field(
        default_factory=dict, description="route -> training job started by `retrain=true`"
    )


class VacuumResult(_Response):
    """The store's files (database and WAL) before and after VACUUM."""

    bytes_before: int = Field(ge=0)
    bytes_after: int = Field(ge=0)
    duration_ms: float = Field(ge=0)


# --- routes -----------------------------------------------------------------------------


class HistoryEntry(_Response):
    ts: float
    # `from` is a Python keyword: the JSON key is still "from".
    from_: str = Field(alias="from")
    to: str
    reason: str


class RouteSummary(_Response):
    """A configured route and, for an adaptive one, where it stands in the cycle."""

    name: str
    match: list[str]
    upstream: str
    upstream_model: str | None = None
    adapt: bool
    local_model: str
    policy: PolicySettings
    mode: Mode = "cloud"
    serving: Literal["cloud", "local"] = "cloud"
    pinned: Literal["cloud", "local"] | None = None
    active_adapter: int | None = None
    candidate_adapter: int | None = None
    rolling_score: float | None = None
    pass_rate: float | None = None
    window: int = Field(0, description="judged results in the rolling window")
    job_id: str | None = None
    job: JobStatus | None = None
    blocked: str | None = Field(None, description="why no adapter can be trained or served now")
    failed_trainings: int = Field(0, description="training failures since the last success")
    pending_pairs: int | None = Field(
        None, description="usable pairs collected towards the next job (it starts at min_samples)"
    )
    min_samples: int | None = None
    rejections_in_a_row: int = Field(0, description="candidates eval turned down since the last promotion")
    next_training_at: float | None = Field(
        None, description="earliest start of the next job (mode cloud; it also needs min_samples new pairs)"
    )
    held_back: str | None = Field(
        None, description="why the route is not learning now after failed jobs or rejected candidates"
    )
    eval_deadline: float | None = Field(None, description="when an undecided eval returns to the cloud")
    history: list[HistoryEntry] = Field(default_factory=list)


class RouteList(_Response):
    data: list[RouteSummary]
    next_cursor: None = None


class Traffic(_Response):
    """User requests logged for the route, by who answered them."""

    cloud: int
    local: int
    failover: int


class EvalOut(_Response):
    """One judged comparison of a local answer with the cloud's."""

    id: int
    ts: str
    route: str
    adapter_version: int | None = None
    phase: str
    judge: str
    passed: bool | None = None
    score: float | None = None
    scores: Any = None
    prompt: Any = None
    cloud_answer: Any = None
    local_answer: Any = None
    reason: str | None = None
    error: str | None = None
    latency_ms: float | None = None


class RouteDetail(RouteSummary):
    traffic: Traffic
    recent_evals: list[EvalOut]


class DatasetImport(_Response):
    id: str
    route: str
    name: str
    pairs: int = Field(ge=1)
    heldout: bool = Field(description="whether the judge may hold some of these pairs out")
    created_at: float


class DatasetList(_Response):
    data: list[DatasetImport]
    next_cursor: None = None


class DeletedImport(_Response):
    id: str
    deleted: bool = True


class JobAccepted(_Response):
    job_id: str


class EvalAccepted(_Response):
    adapter_version: int
    status: Literal["started"] = "started"


class AdapterOut(_Response):
    version: int
    path: str
    active: bool
    candidate: bool
    meta: dict[str, Any]


class AdapterList(_Response):
    data: list[AdapterOut]
    next_cursor: None = None


# --- dashboard --------------------------------------------------------------------------


class SeriesPoint(_Response):
    """Traffic in one sampling interval ending at `t` (epoch seconds)."""

    t: float
    cloud: int
    local: int
    failover: int
    errors: int = Field(description="answers with a 5xx status")
    p50_ms: float | None = None
    p95_ms: float | None = None


class ScorePoint(_Response):
    ts: float
    score: float | None
    passed: bool | None
    phase: str


class EvalView(_Response):
    """An eval made readable: the question and the two answers as text."""

    id: int
    ts: float
    phase: str
    adapter_version: int | None = None
    passed: bool | None = None
    score: float | None = None
    question: str
    cloud_answer: str
    local_answer: str | None = None
    reason: str | None = None
    error: str | None = None


class RouteTotals(_Response):
    """Requests and `local_skipped`: since this process started (its Prometheus counters).
    The USD figures: the cost ledger, every replica's answers since the store began."""

    requests: dict[str, int]
    cost_usd: float
    cost_saved_usd: float
    judge_cost_usd: float = Field(0.0, description="spent on the gateway's own calls: judging, spot checks")
    net_saved_usd: float = Field(0.0, description="cost_saved_usd less judge_cost_usd")
    local_skipped: dict[str, int] = Field(
        default_factory=dict, description="requests the cloud answered on a local route, by reason"
    )


class CostTotal(_Response):
    """One group of the cost ledger; only the grouped-by fields are present."""

    day: str | None = Field(None, description="UTC date, YYYY-MM-DD")
    route: str | None = None
    client: str | None = Field(None, description="the client key's name, or the client address")
    backend: Backend | None = None
    kind: Literal["spend", "savings", "judge"] | None = None
    usd: float
    answers: int


class CostList(_Response):
    data: list[CostTotal]
    next_cursor: None = None


class DashboardRoute(_Response):
    name: str
    adapt: bool
    upstream_model: str | None = None
    match: list[str]
    mode: Mode
    serving: Literal["cloud", "local"]
    pinned: Literal["cloud", "local"] | None = None
    threshold: float = Field(description="the score one judged answer needs to pass")
    rolling_threshold: float = Field(description="the rolling mean a local route must keep")
    window_size: int
    rolling_score: float | None = None
    pass_rate: float | None = None
    active_adapter: int | None = None
    candidate_adapter: int | None = None
    blocked: str | None = Field(None, description="why the route cannot learn now, if it cannot")
    eval_deadline: float | None = Field(None, description="when an undecided eval returns to the cloud")
    pending_pairs: int | None = Field(None, description="usable pairs collected towards the next job")
    min_samples: int | None = None
    job: JobStatus | None = None
    latest_adapter: dict[str, Any] | None = None
    history: list[HistoryEntry]
    series: list[SeriesPoint]
    scores: list[ScorePoint]
    evals: list[EvalView]
    totals: RouteTotals


class Dashboard(_Response):
    generated_at: float
    started_at: float
    ready: bool
    local_backend: str | None = None
    interval_s: float
    routes: list[DashboardRoute]
