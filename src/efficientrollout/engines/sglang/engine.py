"""The SGLang backend: an engine process that serves its waves through its own SGLang server.

We encode prompts ourselves (the same chat template and ids as the native backend), send one
`/generate` per sample with `input_ids` and SGLang sampling parameters mapped one to one, and
yield each sample's result as soon as SGLang answers it. SGLang's `output_token_logprobs` are
already our definition: `log_softmax(logits / T)` over the full vocabulary before top-k/top-p
(SGLang takes the log of the temperature-scaled softmax before filtering; greedy requests get
T = 1), which the tests check against the native engine on the same tokens.

Weights: an update is validated against the served checkpoint (names, shapes, finiteness)
before SGLang sees it, laid out as a model directory (the served config and tokenizer beside
the new safetensors) and loaded with SGLang's own `/update_weights_from_disk`, tagged with our
version as SGLang's `weight_version`, between waves (pause → load → continue). Every result
carries our policy version, and a result whose `weight_version` disagrees is an error.

Failures: an HTTP 4xx on one sample is that sample's error result. A server that dies or stops
answering makes the wave fail (the worker serves its requests again or releases them); the
next wave restarts the server first.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import httpx
import torch

from ...models import WeightError, check_state_dict, read_state_dict
from ...models.checkpoint import resolve_model, safetensor_files
from ...protocol import (
    FINISH_LENGTH,
    FINISH_STOP,
    RolloutRequest,
    RolloutResult,
    SpeculationStats,
    StepRecord,
    Timings,
)
from ...sampling import derive_seed
from ..native.engine import EngineConfig, resolve_device, resolve_dtype
from ..base import engine_error, in_request_order
from ..prompts import PromptError, encode_prompt
from .config import SGLangConfig
from .server import SGLangServer


class SGLangEngine:
    backend = "sglang"

    def __init__(self, config: EngineConfig, sglang: SGLangConfig | None = None, *, engine_id: str | None = None,
                 workdir: str | os.PathLike | None = None):
        from transformers import AutoTokenizer

        sglang = sglang or SGLangConfig()
        if sglang.sglang_speculation == "efficientrollout" and config.speculation.mode == "toggle-ladder":
            raise ValueError("inside SGLang our drafter is gated by plain, always or adaptive; toggle-ladder needs the native engine")
        self.config, self.sglang = config, sglang
        self.device = resolve_device(config.device)
        self.dtype = str(resolve_dtype(config.dtype, self.device)).removeprefix("torch.")
        self.model_path = resolve_model(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.vocab_size = len(self.tokenizer)
        self.reference = _checkpoint_shapes(self.model_path)  # what an update must look like
        self.tied = "lm_head.weight" not in self.reference
        self.version = 0
        self.engine_id = engine_id or f"sglang-{socket.gethostname()}-{os.getpid()}"
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="efficientrollout-sglang."))
        self.trace: list[StepRecord] = []
        self._steps = StepLog(self.workdir / "steps.jsonl")  # our algorithm's step trace, written by the server
        self._served_dir = self.model_path
        self._abort = threading.Event()
        self._generating = False
        self.server = SGLangServer(sglang.sglang_python, self._server_args(self.model_path, 0), self._server_env(),
                                   self.workdir / "sglang.log", sglang.sglang_startup_timeout_s)
        self.server.ensure()
        self.http = httpx.Client(timeout=httpx.Timeout(sglang.sglang_request_timeout_s, connect=10.0),
                                 limits=httpx.Limits(max_connections=config.max_batch_size))

    def _server_args(self, model_dir: Path, version: int) -> list[str]:
        """The server's flags; a restarted server comes back with the weights and version last loaded."""
        c, s = self.config, self.sglang
        args = ["--model-path", str(model_dir), "--weight-version", str(version), "--dtype", self.dtype, "--device", self.device.type,
                "--context-length", str(c.max_seq_len), "--max-running-requests", str(c.max_batch_size),
                "--max-total-tokens", str(s.sglang_max_total_tokens), "--log-level", "warning", "--skip-server-warmup"]
        if self.device.type == "cpu":  # SGLang's CPU docs: its overlap scheduler's spinning thread starves 2 cores
            args += ["--disable-cuda-graph", "--disable-overlap-schedule"]
        if s.sglang_speculation == "efficientrollout":
            args += ["--speculative-algorithm", "EFFICIENTROLLOUT", "--speculative-num-steps", str(c.speculation.k_max)]
            if self.device.type != "cpu" and os.environ.get("EFFICIENTROLLOUT_CUDA_GRAPHS", "0") != "1":
                args += ["--disable-cuda-graph"]  # the worker would drop SGLang's graphs: do not capture them
        if s.sglang_speculation == "standalone":
            args += ["--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path", str(model_dir),
                     "--speculative-num-steps", str(s.sglang_draft_tokens - 1), "--speculative-eagle-topk", "1",
                     "--speculative-num-draft-tokens", str(s.sglang_draft_tokens)]
        return args + s.sglang_args.split()

    def _server_env(self) -> dict[str, str]:
        env = {"SGLANG_USE_CPU_ENGINE": "1"} if self.device.type == "cpu" else {}
        if self.sglang.sglang_speculation == "efficientrollout":  # read by our worker inside SGLang
            spec = self.config.speculation
            env |= {"EFFICIENTROLLOUT_SPECULATION": spec.mode, "EFFICIENTROLLOUT_SPECULATION_K": str(spec.k),
                    "EFFICIENTROLLOUT_DRAFTER": spec.drafter, "EFFICIENTROLLOUT_DRAFTER_KERNEL": spec.drafter_kernel, "EFFICIENTROLLOUT_SGLANG_TRACE": str(self._steps.path)}
        return env

    def close(self) -> None:
        self.http.close()
        self.server.stop()

    # ---- weights -------------------------------------------------------------------------

    def update_weights(self, weights: Mapping[str, torch.Tensor] | str | os.PathLike, version: int) -> float:
        """Validate, lay out as a model directory, and load through SGLang between waves;
        WeightError (old weights and version keep serving) if anything does not fit."""
        if self._generating:
            raise RuntimeError("update_weights is only allowed between waves, not while generating")
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an int >= 0, got {version!r}")
        t0 = time.perf_counter()
        state = dict(weights) if isinstance(weights, Mapping) else read_state_dict(weights)
        source = f"state dict for version {version}" if isinstance(weights, Mapping) else str(weights)
        check_state_dict(self.reference, state, self.tied, source)
        target = self.workdir / f"weights-v{version}"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for f in self.model_path.iterdir():  # config, tokenizer, chat template: everything but the weights
            if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
                os.symlink(f, target / f.name)
        if isinstance(weights, Mapping):
            from ...policies.store import save_state_dict

            save_state_dict(state, target / "model.safetensors")
        else:
            for i, f in enumerate(safetensor_files(Path(weights))):  # hard links: the caller may delete its download
                dest = target / f"model-{i:05d}.safetensors"
                if f.stat().st_dev == target.stat().st_dev:
                    os.link(f, dest)
                else:
                    shutil.copyfile(f, dest)
        self.server.ensure()
        self._post("/pause_generation", {"mode": "abort"})
        try:
            r = self._post("/update_weights_from_disk", {"model_path": str(target), "weight_version": str(version)})
        finally:
            self._post("/continue_generation", {})
        if not r.get("success"):
            shutil.rmtree(target, ignore_errors=True)
            raise WeightError(f"{source}: SGLang refused it ({r.get('message')}); the previous weights keep serving")
        previous, self._served_dir, self.version = self._served_dir, target, version
        self.server.server_args = self._server_args(target, version)
        if previous != self.model_path:
            shutil.rmtree(previous, ignore_errors=True)
        return time.perf_counter() - t0

    def settle(self) -> None:
        """Nothing deferred: SGLang re-derives our draft as it loads the weights."""

    def _post(self, path: str, body: dict) -> dict:
        r = self.http.post(f"{self.server.url}{path}", json=body, timeout=self.sglang.sglang_startup_timeout_s)
        try:
            return r.json() if r.content else {}
        except ValueError:
            return {"success": False, "message": r.text[:500]}

    # ---- generation ----------------------------------------------------------------------

    def generate(self, requests: Iterable[RolloutRequest]) -> list[RolloutResult]:
        """All results, ordered by request then sample index."""
        requests = list(requests)
        return in_request_order(self.stream(requests), requests)

    def stream(self, requests: Iterable[RolloutRequest], stop: Callable[[], bool] | None = None) -> Iterator[RolloutResult]:
        """One /generate per sample, all in flight at once (SGLang batches them); each result is
        yielded as soon as its sample finishes."""
        if self._generating:
            raise RuntimeError("this engine is already generating a wave")
        self._generating = True
        self._abort.clear()
        wave_t0 = time.time()
        self._steps.reset()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.config.max_batch_size, thread_name_prefix="sglang")
        futures: dict[concurrent.futures.Future, tuple[RolloutRequest, int, str]] = {}
        try:
            samples: list[tuple[RolloutRequest, int, list[int], int]] = []
            for request in requests:
                try:
                    if request.min_policy_version > self.version:
                        raise PromptError(f"min_policy_version {request.min_policy_version} is newer than this "
                                          f"engine's weights (version {self.version})")
                    ids = encode_prompt(self.tokenizer, request, self.vocab_size, self.config.max_seq_len, self.model_path)
                except PromptError as exc:  # one request's failure is its own error result
                    yield from (engine_error(self, request, i, str(exc)) for i in range(request.sampling.n))
                    continue
                base = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63)
                samples += [(request, i, ids, derive_seed(base, i)) for i in range(request.sampling.n)]
            if not samples:
                return
            self.server.ensure()
            for request, i, ids, seed in samples:
                rid = f"{self.engine_id}/{request.id}/{i}/{uuid.uuid4().hex[:8]}"
                futures[pool.submit(self._generate_one, request, i, ids, seed, rid)] = (request, i, rid)
            pending = set(futures)
            while pending:
                if self._abort.is_set() or (stop is not None and stop()):
                    self._post("/abort_request", {"abort_all": True})
                    return
                done, pending = concurrent.futures.wait(pending, timeout=0.1, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    yield future.result()  # a transport failure raises here: the wave fails, the worker decides
        finally:
            for future in futures:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            self.trace = self._steps.steps(wave_t0)
            self._generating = False

    def _drafted(self, rid: str, meta: dict) -> int:
        if self.sglang.sglang_speculation == "efficientrollout":  # K varies per step: our worker counted
            return self._steps.drafted(rid)
        return int(meta.get("spec_num_proposed_drafts", 0))  # STANDALONE drafts a fixed K

    def abort(self) -> None:
        if self._generating:
            self._abort.set()

    def _generate_one(self, request: RolloutRequest, index: int, prompt_ids: list[int], seed: int, rid: str) -> RolloutResult:
        p = request.sampling
        params = {
            "max_new_tokens": min(p.max_new_tokens, self.config.max_seq_len - len(prompt_ids)),
            "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k if p.top_k > 0 else -1,
            "stop": p.stop or None, "stop_token_ids": p.stop_token_ids or None, "ignore_eos": p.ignore_eos,
            "sampling_seed": seed & 0x7FFFFFFF,  # honoured where SGLang supports it (not on CPU)
        }
        t0 = time.perf_counter()
        r = self.http.post(f"{self.server.url}/generate", json={
            "input_ids": prompt_ids, "sampling_params": params, "return_logprob": True, "logprob_start_len": -1, "rid": rid})
        if 400 <= r.status_code < 500:  # this sample's own problem (SGLang validated and refused it)
            return engine_error(self, request, index, f"SGLang refused the request (HTTP {r.status_code}): {r.text[:300]}")
        r.raise_for_status()
        out = r.json()
        meta = out["meta_info"]
        finish = (meta.get("finish_reason") or {}).get("type")
        if finish == "abort":
            return engine_error(self, request, index, f"SGLang aborted the request: {meta.get('finish_reason')}")
        if str(meta.get("weight_version", self.version)) != str(self.version):
            return engine_error(self, request, index, f"served by SGLang weight_version {meta.get('weight_version')}, "
                                                      f"expected {self.version}")
        token_logprobs = meta["output_token_logprobs"]  # [[logprob, token id, text], ...]
        return RolloutResult(
            request_id=request.id, sample_index=index, policy_version=self.version, prompt_token_ids=prompt_ids,
            output_token_ids=[int(t[1]) for t in token_logprobs], text=out["text"], logprobs=[float(t[0]) for t in token_logprobs],
            finish_reason=FINISH_LENGTH if finish == "length" else FINISH_STOP, engine_id=self.engine_id,
            backend=self.backend, dtype=self.dtype, metadata=request.metadata,
            timings=Timings(decode_s=time.perf_counter() - t0),  # SGLang's own split is not reported uniformly
            speculation=SpeculationStats(drafted=self._drafted(rid, meta), accepted=int(meta.get("spec_num_correct_drafts", 0))),
        )



class StepLog:
    """The trace our algorithm writes inside SGLang (one JSON line per decode step, one per finished
    request), read incrementally by the engine's threads; truncated at every wave's start (the
    server appends with O_APPEND, so it writes on from the new end)."""

    def __init__(self, path: Path):
        self.path, self.lock = path, threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            if self.path.exists():
                os.truncate(self.path, 0)
            self.offset, self.records, self.by_rid = 0, [], {}

    def _read(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next read
        self.offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "rid" in record:
                self.by_rid[record["rid"]] = record["drafted"]
            else:
                self.records.append(record)

    def drafted(self, rid: str) -> int:
        with self.lock:
            self._read()
            return self.by_rid.pop(rid, 0)

    def steps(self, wave_t0: float) -> list[StepRecord]:
        with self.lock:
            self._read()
            return [StepRecord(s["t"] - wave_t0, s["batch"], s["k"], s["batch"] * s["k"], s["accepted"],
                               s["accepted"] + s["batch"], s["s"]) for s in self.records]


def _checkpoint_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The served checkpoint's tensor names and shapes, as storage-less (meta) tensors."""
    from safetensors import safe_open

    shapes = {}
    for file in safetensor_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                shapes[name] = torch.empty(f.get_slice(name).get_shape(), device="meta")
    return shapes

