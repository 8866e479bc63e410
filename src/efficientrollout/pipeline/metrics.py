"""Worker metrics in the Prometheus text format, and the tiny HTTP endpoint that serves them.

The endpoint is a few lines on anyio's TCP listener rather than a web framework: it answers
`GET /metrics` and `GET /healthz` and nothing else, and it must not take over the process's
signal handling (the worker owns SIGTERM).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields

import anyio
import anyio.abc

# name → (type, help); the value is the WorkerMetrics field of the same name
_HELP = {
    "waves": ("counter", "waves served"),
    "requests": ("counter", "queue entries claimed"),
    "results": ("counter", "results written (errors included)"),
    "errors": ("counter", "error results written"),
    "output_tokens": ("counter", "output tokens generated"),
    "deferred": ("counter", "requests put back because they need a newer policy version"),
    "engine_failures": ("counter", "engine waves that raised (their requests were served again apart or released)"),
    "decode_steps": ("counter", "decode steps"),
    "speculative_steps": ("counter", "decode steps that speculated (K > 0)"),
    "drafted_tokens": ("counter", "draft tokens proposed"),
    "accepted_tokens": ("counter", "draft tokens accepted"),
    "weight_updates": ("counter", "policy versions loaded"),
    "weight_update_failures": ("counter", "policy versions that failed to download or load (old weights kept)"),
    "policy_version": ("gauge", "policy version being served"),
    "tokens_per_second": ("gauge", "output tokens per second over the last wave"),
    "acceptance_rate": ("gauge", "accepted / drafted tokens since start"),
    "speculated_fraction": ("gauge", "fraction of decode steps that speculated since start"),
    "last_weight_update_seconds": ("gauge", "download + load time of the last update (the drafter re-quantizes after, while idle)"),
    "queue_waiting": ("gauge", "requests waiting in the queue"),
    "queue_pending": ("gauge", "requests claimed by workers and not finished"),
    "queue_lag_seconds": ("gauge", "how long the oldest waiting request has waited"),
}


@dataclass(slots=True)
class WorkerMetrics:
    waves: int = 0
    requests: int = 0
    results: int = 0
    errors: int = 0
    output_tokens: int = 0
    deferred: int = 0
    engine_failures: int = 0
    decode_steps: int = 0
    speculative_steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    weight_updates: int = 0
    weight_update_failures: int = 0
    policy_version: int = 0
    tokens_per_second: float = 0.0
    last_weight_update_seconds: float = 0.0
    queue_waiting: int = 0
    queue_pending: int = 0
    queue_lag_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def speculated_fraction(self) -> float:
        return self.speculative_steps / self.decode_steps if self.decode_steps else 0.0

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in _HELP}

    def render(self, labels: dict[str, str]) -> str:
        label = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines = []
        for name, (kind, help_) in _HELP.items():
            metric = f"efficientrollout_{name}" + ("_total" if kind == "counter" else "")
            lines += [f"# HELP {metric} {help_}", f"# TYPE {metric} {kind}", f"{metric}{{{label}}} {getattr(self, name)}"]
        return "\n".join(lines) + "\n"


assert {f.name for f in fields(WorkerMetrics)} <= set(_HELP)

Handler = Callable[[str], Awaitable[tuple[int, str, str]]]  # path → (status, content type, body)


async def serve_http(host: str, port: int, handler: Handler, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve GET requests with `handler` until cancelled; reports the bound port to `start`."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            head = b""
            with anyio.move_on_after(5):
                while b"\r\n\r\n" not in head and len(head) < 8192:
                    try:
                        head += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
            parts = head.split(b" ", 2)
            if len(parts) < 2 or parts[0] != b"GET":
                status, ctype, body = 405, "text/plain", "only GET\n"
            else:
                status, ctype, body = await handler(parts[1].decode("latin-1").split("?")[0])
            payload = body.encode()
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}.get(status, "OK")
            await stream.send(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n"
                              f"Connection: close\r\n\r\n".encode() + payload)

    await listener.serve(handle)
