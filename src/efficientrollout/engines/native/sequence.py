"""One sample being generated: plain-Python bookkeeping, no tensors."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from ...protocol import (
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    RolloutRequest,
    SamplingParams,
)


@dataclass(slots=True)
class Sequence:
    request: RolloutRequest
    sample_index: int
    prompt_ids: list[int]
    seed: int
    max_len: int  # the engine's context capacity (prompt + output)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None  # why this sample could not be served (finish_reason "error")
    stop_text_at: int | None = None  # where a matched stop string starts in the decoded text
    drafted: int = 0
    accepted: int = 0
    t_enqueued: float = field(default_factory=time.perf_counter)
    t_admitted: float = 0.0
    t_first_token: float = 0.0
    prefill_s: float = 0.0

    @property
    def params(self) -> SamplingParams:
        return self.request.sampling

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_position(self) -> int:
        """Position of the newest token, the one whose K/V the next step writes."""
        return self.num_tokens - 1

    def append(self, token: int, logprob: float, eos_ids: frozenset[int], tokenizer) -> bool:
        """Add one token; set finish_reason if a stop condition fires. Returns True if finished."""
        assert self.finish_reason is None
        p = self.params
        if not math.isfinite(logprob):  # e.g. a temperature so small that logits / T overflow
            return self.fail(f"the log-probability of the sampled token is {logprob} at temperature {p.temperature}")
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        if (token in eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            self.finish_reason = FINISH_STOP
        elif p.stop and self._hit_stop_string(tokenizer):
            self.finish_reason = self.finish_reason or FINISH_STOP  # an undecodable output stays an error
        elif len(self.output_ids) >= p.max_new_tokens or self.num_tokens >= self.max_len:
            self.finish_reason = FINISH_LENGTH
        return self.finish_reason is not None

    def fail(self, error: str) -> bool:
        """Finish this sample with an error result (its tokens so far are dropped)."""
        self.output_ids, self.logprobs, self.stop_text_at = [], [], None
        self.finish_reason, self.error = FINISH_ERROR, error
        return True

    def _hit_stop_string(self, tokenizer) -> bool:
        # A stop string completed by this token lies within the last few tokens' text; decode
        # only that window each step, the whole text once on a hit.
        try:
            return self._find_stop_string(tokenizer)
        except Exception as exc:  # noqa: BLE001 - a tokenizer failure on this sample's tokens is this sample's error
            return self.fail(f"could not decode the output to look for stop strings ({type(exc).__name__}: {exc})")

    def _find_stop_string(self, tokenizer) -> bool:
        window = max(len(s) for s in self.params.stop) + 8
        tail = tokenizer.decode(self.output_ids[-window:], skip_special_tokens=True)
        if not any(s in tail for s in self.params.stop):
            return False
        text = tokenizer.decode(self.output_ids, skip_special_tokens=True)
        self.stop_text_at = min(i for i in (text.find(s) for s in self.params.stop) if i >= 0)
        return True

    def text(self, tokenizer) -> str:
        """The decoded output; a matched stop string and whatever follows it are cut off."""
        text = tokenizer.decode(self.output_ids, skip_special_tokens=True)
        return text if self.stop_text_at is None else text[: self.stop_text_at]
