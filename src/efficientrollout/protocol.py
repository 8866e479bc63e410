"""Wire types every process speaks (msgspec Structs).

Validation lives here, at the boundary: unknown fields and out-of-range values are rejected
with a message that names the field, so a malformed request becomes an error result instead of
a dead engine.
"""

from __future__ import annotations

import msgspec

FINISH_STOP = "stop"  # EOS, a stop token id or a stop string
FINISH_LENGTH = "length"  # max_new_tokens or the engine's context capacity
FINISH_ERROR = "error"  # the request could not be served; see RolloutResult.error


class SamplingParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """temperature == 0 is greedy. top_k == 0 and top_p == 1 disable those filters.

    `seed` makes sampling reproducible: sample i of a request with seed s draws the same
    tokens whatever else shares the batch. Without a seed each sample gets a fresh random one.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.n <= 1024:
            raise ValueError(f"n must be in 1..1024, got {self.n}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be >= 0")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: str


class RolloutRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One prompt, given as exactly one of `prompt` (text), `messages` (chat; the model's chat
    template is applied with a generation prompt) or `prompt_token_ids`."""

    id: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    prompt_token_ids: list[int] | None = None
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    min_policy_version: int = 0
    metadata: dict[str, object] = {}

    def __post_init__(self) -> None:
        given = [f for f in ("prompt", "messages", "prompt_token_ids") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, messages, prompt_token_ids (got {given or 'none'})")
        if not self.id:
            raise ValueError("id must be non-empty")
        if self.min_policy_version < 0:
            raise ValueError(f"min_policy_version must be >= 0, got {self.min_policy_version}")


class Timings(msgspec.Struct, kw_only=True):
    queued_s: float = 0.0  # waiting for a batch slot
    prefill_s: float = 0.0  # wall time of the prefill this sample was part of
    decode_s: float = 0.0  # from first to last token


class SpeculationStats(msgspec.Struct, kw_only=True):
    drafted: int = 0  # draft tokens proposed for this sample
    accepted: int = 0  # of which the target accepted


class RolloutResult(msgspec.Struct, kw_only=True):
    """One completion. `logprobs[i]` is the target policy's log-probability of
    `output_token_ids[i]` under the temperature-scaled full-vocabulary distribution
    (log_softmax(logits / T); T = 1 for greedy requests), before any top-k/top-p filter,
    computed by `backend` in `dtype`: an fp32 engine matches a trainer's fp32 recomputation to
    ~1e-5 nats, a bf16 one only to bf16's noise (SmolLM2: ~0.045 nats mean, 0.3-0.7 at single tokens)."""

    request_id: str
    sample_index: int
    policy_version: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    error: str | None = None
    engine_id: str = ""
    backend: str = ""  # the engine backend that generated it: "native", "sglang"
    dtype: str = ""  # the precision its log-probs were computed in: "float32", "bfloat16", ...
    timings: Timings = msgspec.field(default_factory=Timings)
    speculation: SpeculationStats = msgspec.field(default_factory=SpeculationStats)
    metadata: dict[str, object] = {}


def error_result(request_id: str, sample_index: int, error: str, policy_version: int, metadata: dict[str, object],
                 engine_id: str = "", backend: str = "", dtype: str = "") -> RolloutResult:
    """The result of a sample that could not be served: no tokens, `finish_reason` "error", `error` says why."""
    return RolloutResult(request_id=request_id, sample_index=sample_index, policy_version=policy_version, prompt_token_ids=[],
                         output_token_ids=[], text="", logprobs=[], finish_reason=FINISH_ERROR, error=error, engine_id=engine_id,
                         backend=backend, dtype=dtype, metadata=metadata)


class FileEntry(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    size: int  # bytes
    sha256: str  # hex digest; engines verify every download against it


class WeightManifest(msgspec.Struct, forbid_unknown_fields=True):
    """What the policy server says about a stored version (GET /v1/versions/{v}/manifest)."""

    version: int
    created: float  # unix time the version became visible
    files: list[FileEntry]


class StepRecord(msgspec.Struct, array_like=True):
    """What one engine step did: the raw material of benchmarks and timeline plots."""

    t: float  # seconds since the wave started
    batch: int  # running rows
    k: int  # draft length (0 = plain step)
    drafted: int  # draft tokens proposed this step (batch * k)
    accepted: int  # of which accepted
    emitted: int  # tokens emitted this step
    seconds: float  # wall time of the step


class WaveTrace(msgspec.Struct, kw_only=True):
    """One wave's step trace, as each engine appends it to the capped `<prefix>:trace` stream."""

    engine: str
    version: int  # the policy version that served the wave
    end: float  # unix time the wave ended
    seconds: float  # the wave's wall time
    requests: list[str]  # ids of the requests it served
    steps: list[StepRecord]


class EngineStatus(msgspec.Struct, kw_only=True):
    """An engine's heartbeat (JSON at `<prefix>:engines:<id>`, expiring 10 s after the last
    beat; `efficientrollout status` reads them) and the body of its /healthz."""

    engine: str
    backend: str
    dtype: str  # the precision its results' log-probs are computed in
    host: str
    pid: int
    state: str  # starting | idle | updating | draining | redis-down
    version: int  # the policy version it serves
    waves: int
    results: int
    tokens: int
    tokens_per_second: float  # over the last wave
    acceptance: float  # accepted / drafted tokens since start
    speculated: float  # fraction of decode steps that speculated since start
    update_failures: int
    metrics: str | None  # its /metrics URL, if it serves one
    uptime_s: float
