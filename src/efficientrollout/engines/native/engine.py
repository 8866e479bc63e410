"""The native PyTorch rollout engine: continuous batching within a wave, versioned weights.

`stream(requests)` is the whole algorithm: admit waiting samples into free cache slots
(prefill), decode one token for every running sample, retire finished ones (compacting the
batch), repeat. Bookkeeping is plain Python (Sequence); tensors live in ModelRunner.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from ... import cpu
from ...options import option
from ...models import (
    DEFAULT_MODEL,
    CheckpointError,
    load_model,
    load_weights,
    read_state_dict,
)
from ...protocol import (
    RolloutRequest,
    RolloutResult,
    SpeculationStats,
    StepRecord,
    Timings,
)
from ...sampling import SamplingBatch, derive_seed, race_keys, sample, seeded_uniform
from ...speculation import Drafter, SpeculationConfig, SpeculationGate
from ...speculation.drafter import drafter_kernel
from ..base import EngineUnusable, engine_error, in_request_order
from ..prompts import PromptError, encode_prompt
from .runner import ModelRunner
from .sequence import Sequence
from .speculative import speculative_step


@dataclass(slots=True)
class EngineConfig:
    model: str = option(DEFAULT_MODEL, "'smollm2' (the bundled SmolLM2-135M-Instruct) or a local HF model directory")
    device: str = option("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: str = option("auto", "precision of weights and log-probs; auto: bf16 on CUDA and on CPUs with native bf16 "
                        "math, else fp32 (float32 gives log-probs that match an fp32 trainer)",
                        choices=("auto", "float32", "bfloat16", "float16"))
    max_batch_size: int = option(64, "samples decoded together (KV cache slots)")
    max_seq_len: int = option(2048, "prompt + output tokens per sample (KV cache length)")
    max_prefill_tokens: int = option(8192, "padded prompt tokens per prefill forward")
    cuda_graphs: bool = option(False, "CUDA only: replay decode, draft and verify steps from CUDA graphs (captured on "
                               "first use per padded batch, width and key length; unmeasured on a GPU so far)")
    speculation: SpeculationConfig = option(default_factory=SpeculationConfig)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.max_batch_size < 1 or self.max_seq_len < 2 or self.max_prefill_tokens < 1:
            raise ValueError("max_batch_size, max_seq_len and max_prefill_tokens must be positive")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16
    # Without AVX512-BF16/AMX, CPU bf16 matmuls fall back to scalar code (~300x slower here).
    return torch.bfloat16 if cpu.native_bf16() else torch.float32


class NativeEngine:
    backend = "native"

    def __init__(self, config: EngineConfig | None = None, *, engine_id: str | None = None):
        self.config = config = config or EngineConfig()
        self.device = resolve_device(config.device)
        self.torch_dtype = resolve_dtype(config.dtype, self.device)
        self.dtype = str(self.torch_dtype).removeprefix("torch.")  # what results report their log-probs in
        loaded = load_model(config.model, self.torch_dtype, self.device, config.max_seq_len)
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
        self.model_path = loaded.path
        self.runner = ModelRunner(loaded.decoder, config.max_batch_size, config.max_seq_len, config.cuda_graphs,
                                  max_width=config.speculation.k_max + 1)
        self.version = 0
        self.engine_id = engine_id or f"native-{socket.gethostname()}-{os.getpid()}"
        self._generating = False
        self._abort = False
        self._lock = threading.Lock()  # makes abort() and the start of a wave atomic with each other
        self.gate = SpeculationGate(config.speculation)
        self.drafter: Drafter | None = None
        self.trace: list[StepRecord] = []  # the last wave's steps
        if config.speculation.mode != "plain":
            spec = config.speculation
            kernel = drafter_kernel(spec.drafter, self.device, self.torch_dtype, spec.drafter_kernel)
            self.drafter = Drafter(self.decoder, kernel=kernel, group_size=spec.int4_group_size, vocab=0 if spec.drafter == "exact" else spec.draft_vocab)
            if config.speculation.probe:
                self.probe()

    def probe(self, batches: tuple[int, ...] = (1, 4, 16, 64), k: int = 3, context: int = 256) -> float:
        """Seed the gate's cost tables: a plain step, a drafter step and K=1 and K=3 verifies at a
        few batch sizes (and a K=k_max verify up to batch 4, where long drafts pay: extrapolated
        from K=3 and plain alone, longer verifies looked dearer than they are and the gate stayed
        at K=3 where K=7 was 1.13-1.18x faster), each over `context` cached positions (a
        typical rollout's; attention over an empty cache made verify look cheap at large batches,
        and the gate speculated there until its measurements caught up). A few seconds; the
        cache slots are free between waves."""
        assert not self._generating and self.drafter is not None
        t0 = time.perf_counter()
        k_max = self.config.speculation.k_max
        context = max(0, min(context, self.config.max_seq_len - k_max - 1))
        for b in (b for b in batches if b <= self.config.max_batch_size):
            verifies = [(kk + 1, self.decoder) for kk in sorted({1, k, k_max} if b <= 4 else {1, k})]
            for width, decoder in ((1, self.decoder), (1, self.drafter.decoder), *verifies):
                tokens = torch.zeros(b, width, dtype=torch.long, device=self.device)
                positions = context + torch.arange(width, device=self.device).expand(b, width)
                best = min(self._timed(tokens, positions, context + width, decoder) for _ in range(2))
                if decoder is self.drafter.decoder:
                    self.gate.observe_draft(b, best)
                elif width == 1:
                    self.gate.observe_target(b, best)
                else:
                    self.gate.observe_verify(b, width - 1, best)
        return time.perf_counter() - t0

    def _timed(self, *forward_args) -> float:
        self.runner.synchronize()
        t0 = time.perf_counter()
        self.runner.forward(*forward_args)
        self.runner.synchronize()
        return time.perf_counter() - t0

    @property
    def decoder(self):
        return self.runner.decoder

    # ---- weights -------------------------------------------------------------------------

    def update_weights(self, weights: Mapping[str, torch.Tensor] | str | os.PathLike, version: int) -> float:
        """Load new weights in place (no re-allocation) between waves; returns seconds taken.

        `weights` is a HF-named state dict, a .safetensors file or a directory of them. Anything
        that does not fit (names, shapes, non-finite values) raises WeightError and leaves the
        previous weights and version serving."""
        if self._generating:
            raise RuntimeError("update_weights is only allowed between waves, not while generating")
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an int >= 0, got {version!r}")
        t0 = time.perf_counter()
        if isinstance(weights, Mapping):
            state, source = weights, f"state dict for version {version}"
        else:
            state, source = read_state_dict(weights), str(weights)
        load_weights(self.decoder, dict(state), source)
        if self.drafter is not None:  # re-quantized in settle() while idle, or before its first draft
            self.drafter.stale = True
        self.version = version
        return time.perf_counter() - t0

    def settle(self) -> None:
        """Re-quantize the drafter after a weight update, off the update's critical path."""
        if self.drafter is not None and not self._generating:
            self.drafter.ensure_fresh()

    # ---- generation ----------------------------------------------------------------------

    def generate(self, requests: Iterable[RolloutRequest]) -> list[RolloutResult]:
        """All results, ordered by request then sample index."""
        requests = list(requests)
        return in_request_order(self.stream(requests), requests)

    def stream(self, requests: Iterable[RolloutRequest], stop: Callable[[], bool] | None = None) -> Iterator[RolloutResult]:
        """Generate a wave; yield each sample's result as soon as it finishes. A request that
        cannot be served (encoding, chat template, non-finite log-probs) gets error results and
        the wave goes on; `stop()` turning true (or `abort()`) ends the wave after its current
        step, and samples not finished by then yield no result."""
        with self._lock:
            if self._generating:
                raise RuntimeError("this engine is already generating a wave")
            self._generating, self._abort = True, False
        try:
            waiting: deque[Sequence] = deque()
            for request in requests:
                try:
                    waiting.extend(self._sequences(request))
                except PromptError as exc:  # one request's failure is its own error result
                    yield from (engine_error(self, request, i, str(exc)) for i in range(request.sampling.n))
            running: list[Sequence] = []
            self.trace, self._wave_t0 = [], time.perf_counter()
            if self.drafter is not None:
                self.drafter.refresh_head()  # the drafter's vocabulary, from the tokens emitted so far
            self.gate.start_wave()
            while (waiting or running) and not self._abort and not (stop is not None and stop()):
                if waiting and len(running) < self.config.max_batch_size:
                    yield from self._admit(waiting, running)
                if running:
                    yield from self._decode_step(running, wave_filled=not waiting)
            self.gate.end_wave()
        except Exception as exc:
            if self.device.type == "cuda" and isinstance(exc, getattr(torch, "AcceleratorError", ())):
                raise EngineUnusable(f"the CUDA context is broken: {exc}") from exc
            raise
        finally:
            with self._lock:
                self._generating = self._abort = False

    def close(self) -> None:
        """Nothing outlives the process."""

    def abort(self) -> None:
        """Stop the wave being generated after its current step (between waves: no effect).
        Thread-safe: a worker that must shut down now calls it from its event loop."""
        with self._lock:
            if self._generating:
                self._abort = True

    def _sequences(self, request: RolloutRequest) -> list[Sequence]:
        if request.min_policy_version > self.version:
            raise PromptError(f"min_policy_version {request.min_policy_version} is newer than this engine's weights (version {self.version})")
        prompt_ids = encode_prompt(self.tokenizer, request, self.decoder.cfg.vocab_size, self.config.max_seq_len, self.model_path)
        base = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63)
        return [
            Sequence(request, i, prompt_ids, derive_seed(base, i), self.config.max_seq_len)
            for i in range(request.sampling.n)
        ]

    def _admit(self, waiting: deque[Sequence], running: list[Sequence]) -> Iterator[RolloutResult]:
        """Prefill as many waiting samples as there are free slots, in token-budgeted groups."""
        free = self.config.max_batch_size - len(running)
        while waiting and free > 0:
            group = [waiting.popleft()]
            prompts = {tuple(group[0].prompt_ids)}  # equal prompts run once (runner.prefill): the budget counts each once
            while waiting and len(group) < free:
                width = max(len(s.prompt_ids) for s in (*group, waiting[0]))
                if width * len(prompts | {tuple(waiting[0].prompt_ids)}) > self.config.max_prefill_tokens:
                    break
                group.append(waiting.popleft())
                prompts.add(tuple(group[-1].prompt_ids))
            free -= len(group)
            t0 = time.perf_counter()
            slots = list(range(len(running), len(running) + len(group)))
            logits = self.runner.prefill([s.prompt_ids for s in group], slots)
            elapsed = time.perf_counter() - t0
            for s in group:  # before sampling: a sample can finish at its first token
                s.t_admitted, s.prefill_s = t0, elapsed
            running.extend(group)
            yield from self._sample_and_retire(logits, running, slots)

    def _decode_step(self, running: list[Sequence], wave_filled: bool) -> Iterator[RolloutResult]:
        """One step for every running sample: plain, or speculative with the gate's K."""
        b = len(running)
        # K+1 positions must fit the cache; a step never needs to emit more than any row has left
        room = self.config.max_seq_len - 1 - max(s.last_position for s in running)
        left = max(s.params.max_new_tokens - len(s.output_ids) for s in running)
        k = self.gate.choose(b, wave_filled, min(room, left - 1)) if self.drafter is not None else 0
        last_tokens, last_positions = [s.output_ids[-1] for s in running], [s.last_position for s in running]
        captures = self.runner.captures  # a step that captured a CUDA graph says nothing of step costs
        t0 = time.perf_counter()
        if k == 0:
            logits = self.runner.decode(last_tokens, last_positions)
            retired = list(self._sample_and_retire(logits, running, list(range(b))))
            seconds = time.perf_counter() - t0
            if self.runner.captures == captures:
                self.gate.observe_target(b, seconds)
            self.trace.append(StepRecord(t0 - self._wave_t0, b, 0, 0, 0, b, seconds))
            yield from retired
            return
        self.drafter.ensure_fresh()  # weights updated and not settled yet: never draft from old weights
        t0 = time.perf_counter()
        params = self._sampling_batch(running)
        out = speculative_step(
            self.runner, self.drafter.decoder, last_tokens, last_positions, [s.seed for s in running], params, k,
            self.config.speculation.coupling,
        )
        if self.runner.captures == captures:
            self.gate.observe_draft(b, out.draft_s / k)
            self.gate.observe_verify(b, k, out.verify_s)
        self.gate.observe_acceptance(b, k, sum(out.n_accepted), sum(1 for n in out.n_accepted if n < k))
        emitted = 0
        for s, n, tokens, lps in zip(running, out.n_accepted, out.emitted, out.logprobs):
            s.drafted += k
            s.accepted += n
            for tok, lp in zip(tokens, lps):
                emitted += 1
                if s.append(tok, lp, self.eos_token_ids, self.tokenizer):
                    break
        seconds = time.perf_counter() - t0
        self.trace.append(StepRecord(t0 - self._wave_t0, b, k, b * k, sum(out.n_accepted), emitted, seconds))
        yield from self._retire(running)

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        return SamplingBatch.build(
            [s.params.temperature for s in seqs], [s.params.top_p for s in seqs], [s.params.top_k for s in seqs], self.device
        )

    def _sample_and_retire(self, logits: torch.Tensor, running: list[Sequence], slots: list[int]) -> Iterator[RolloutResult]:
        """Pick one token for running[slot] per logits row, then retire finished samples."""
        seqs = [running[i] for i in slots]
        seeds, positions = [s.seed for s in seqs], [s.num_tokens for s in seqs]
        if self.config.speculation.coupling == "race":  # the draw a speculative step verifies against
            tokens, logprobs = sample(logits, self._sampling_batch(seqs), keys=race_keys(seeds, positions).to(logits.device))
        else:
            tokens, logprobs = sample(logits, self._sampling_batch(seqs), uniforms=torch.from_numpy(seeded_uniform(seeds, positions)).to(logits.device))
        now = time.perf_counter()
        for s, tok, lp in zip(seqs, tokens.tolist(), logprobs.tolist()):
            if not s.output_ids:
                s.t_first_token = now
            s.append(tok, lp, self.eos_token_ids, self.tokenizer)
        yield from self._retire(running)

    def _retire(self, running: list[Sequence]) -> Iterator[RolloutResult]:
        """Yield finished samples' results. Retire from the highest slot down, filling each hole
        with the last running sample, so running samples always occupy cache slots 0..b-1."""
        for i in range(len(running) - 1, -1, -1):
            if running[i].finish_reason is None:
                continue
            done, last = running[i], running.pop()
            if self.drafter is not None:
                self.drafter.head.observe(done.output_ids)
            if i < len(running):
                self.runner.move(len(running), i, last.num_tokens)
                running[i] = last
            try:
                result = self._result(done)
            except Exception as exc:  # noqa: BLE001 - e.g. the tokenizer cannot decode this sample's tokens
                result = engine_error(self, done.request, done.sample_index, f"could not build the result ({type(exc).__name__}: {exc})")
            yield result

    def _result(self, s: Sequence) -> RolloutResult:
        if s.error is not None:
            return engine_error(self, s.request, s.sample_index, s.error)
        now = time.perf_counter()
        return RolloutResult(
            request_id=s.request.id,
            sample_index=s.sample_index,
            policy_version=self.version,
            prompt_token_ids=s.prompt_ids,
            output_token_ids=s.output_ids,
            text=s.text(self.tokenizer),
            logprobs=s.logprobs,
            finish_reason=s.finish_reason,
            engine_id=self.engine_id,
            backend=self.backend,
            dtype=self.dtype,
            timings=Timings(queued_s=s.t_admitted - s.t_enqueued, prefill_s=s.prefill_s, decode_s=now - s.t_first_token),
            speculation=SpeculationStats(drafted=s.drafted, accepted=s.accepted),
            metadata=s.request.metadata,
        )


__all__ = ["CheckpointError", "EngineConfig", "NativeEngine", "PromptError"]
