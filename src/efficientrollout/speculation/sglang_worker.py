"""Our self-drafter inside SGLang: `--speculative-algorithm EFFICIENTROLLOUT`.

Registered through SGLang's plugin entry point (`sglang.srt.plugins`, see pyproject.toml), so an
SGLang server with this package installed gains the algorithm; nothing else changes for it.

- **The draft is the served model itself, quantized.** When SGLang (re)loads weights, every
  unquantized linear is also quantized to int8 per channel with torchao (`QuantLinear`, the
  native engine's drafter layer, on the fastest int8 kernel of the device) right before SGLang
  repacks it; the LM head is quantized by the worker. A draft step is the target's own forward
  with those int8 layers switched in: same modules, same attention backend, and the *target's*
  KV pool. It writes its K/V into the very slots the verify pass then overwrites, so there is no
  second pool and no draft catch-up: a gated-off step is a plain SGLang decode step.
- **Never stale.** Every weight-update path of SGLang's model runner is wrapped; after one, any
  layer whose int8 copy was not re-derived by the reload is re-derived from its live weights, or
  speculation stops (plain decoding, logged) where they cannot be read back.
- **Gated per batch.** `SpeculationGate` picks K (0 = plain step) for every decode batch from
  costs measured online here (plain step, draft step, verify over K+1) and the running acceptance.
- **Lossless.** Greedy rows emit the target's argmax; sampled rows use speculative sampling
  against the drafter's own distribution (`speculation.verify`). SGLang's own verify samples
  greedily on CPUs, so it is not used. Batches with parameters our verify does not model
  (min-p, penalties, logit bias, grammars) decode plain.

- **CUDA graphs per K** (`EFFICIENTROLLOUT_CUDA_GRAPHS=1`; written, not yet run on a GPU, so
  off by default: eager, as on CPUs). A step's shape depends on K, so the worker keeps a graph
  runner per shape, each over SGLang's batch buckets with its own attention backend, as
  SGLang's adaptive EAGLE keeps one per step count: a plain decode (width 1, target weights),
  a draft decode (width 1, captured with the int8 layers switched in) and a verify per K in
  `EFFICIENTROLLOUT_GRAPH_KS` (default 1,2,4) plus K_max (SGLang's own start-up capture); the
  gate's K is rounded down to one of those. Re-derived drafts are copied into the captured
  tensors in place, so the graphs never read a stale (or freed) draft. Some attention backends
  (FA3) read the verify width from SGLang's config when they are built, so on CUDA every K
  the worker verifies with has its own backend, built with that width (graphs or not), and K
  is rounded down to those widths; graph runners capture a verify with our chain input (a
  custom algorithm's gets none from SGLang, which FlashInfer's capture cannot take).

Server flags: `--speculative-algorithm EFFICIENTROLLOUT [--speculative-num-steps K_MAX]` (8 by
default); the worker always runs SGLang's non-overlap scheduler. Environment of the server:
`EFFICIENTROLLOUT_SPECULATION` = adaptive (default) | plain | always (with
`EFFICIENTROLLOUT_SPECULATION_K`, default 4); `EFFICIENTROLLOUT_DRAFTER` = int8 (default) | int4
| exact; `EFFICIENTROLLOUT_DRAFTER_KERNEL` = auto (default) or one of `DRAFTER_KERNELS`;
`EFFICIENTROLLOUT_SGLANG_TRACE` = a file that
gets one JSON line per decode step (time, batch, K, accepted, seconds, of which drafting) and
one per finished request (its id and how many tokens were drafted for it: SGLang's own
`spec_num_proposed_drafts` assumes K_max drafts per verify).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time

import torch

from .drafter import QuantLinear, drafter_kernel
from .gate import SpeculationConfig, SpeculationGate
from .verify import verify

ALGORITHM = "EFFICIENTROLLOUT"
DEFAULT_K_MAX = 8

log = logging.getLogger("efficientrollout.sglang")

_drafting = False  # True while a draft forward runs: the patched linears use their int8 copies
_in_place = False  # True once CUDA graphs hold the drafts' tensors: re-derive into them
_loads = itertools.count(1)  # stamps of draft derivations
_target_apply = None  # SGLang's own UnquantizedLinearMethod.apply, once patched


def register() -> None:
    """The `sglang.srt.plugins` entry point: runs in every SGLang process before models load."""
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    SpeculativeAlgorithm.register(ALGORITHM, spec_class=_spec_class())(lambda server_args: SelfDraftWorker)
    _patch_sglang()


def _spec_class():
    from sglang.srt.speculative.spec_registry import CustomSpecAlgo

    class SelfDraft(CustomSpecAlgo):
        def has_draft_kv(self) -> bool:
            return False  # drafts write the target's pool

        def handle_server_args(self, server_args) -> None:
            k = server_args.speculative_num_steps or DEFAULT_K_MAX
            server_args.speculative_num_steps = k
            server_args.speculative_eagle_topk = 1
            server_args.speculative_num_draft_tokens = k + 1
            server_args.disable_overlap_schedule = True  # the worker runs synchronously
            if not server_args.disable_cuda_graph and str(server_args.device).startswith("cuda") and not _graphs_wanted():
                # SGLang captures one verify width with the target's weights; ours varies K per batch
                # and drafts with int8 layers: the per-K graphs (_StepGraphs) have not run on a GPU yet
                log.warning("%s runs without CUDA graphs; EFFICIENTROLLOUT_CUDA_GRAPHS=1 captures one per K "
                            "(not yet run on a GPU)", ALGORITHM)
                server_args.disable_cuda_graph = True

        def create_worker(self, server_args):
            return self.factory(server_args)

        # SGLang 0.5.18 calls these on every algorithm; its CustomSpecAlgo lacks them
        def carries_draft_hidden_states(self) -> bool:
            return False

        def need_topk(self) -> bool:
            return False

        def create_future_map(self, device, req_to_token_pool, needs_cpu_seq_lens: bool = True,
                              needs_confidence_relay: bool = False):
            from sglang.srt.managers.overlap_utils import FutureMap

            return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens, needs_confidence_relay)

    return SelfDraft


def _enabled() -> bool:
    from sglang.srt.runtime_context import get_spec

    try:
        return (get_spec().speculative_algorithm or "").upper() == ALGORITHM
    except Exception:  # config not published in this process: not a model-loading process
        return False


class _Source:
    """What QuantLinear reads from a linear: its weight (only while quantizing) and a fallback."""

    def __init__(self, weight, bias, fallback):
        self.weight, self.bias, self.in_features, self._fallback = weight, bias, weight.shape[-1], fallback

    def __call__(self, x):
        return self._fallback(x)


def _kernel(device, dtype) -> str:
    """EFFICIENTROLLOUT_DRAFTER: int8 (default, torchao per channel) | int4 (group-wise, where a
    fast kernel exists) | exact (the weights themselves: tests); EFFICIENTROLLOUT_DRAFTER_KERNEL
    overrides the kernel."""
    drafter, kernel = os.environ.get("EFFICIENTROLLOUT_DRAFTER", "int8"), os.environ.get("EFFICIENTROLLOUT_DRAFTER_KERNEL", "auto")
    return drafter_kernel(drafter, device, dtype, kernel)


def _graphs_wanted() -> bool:
    return os.environ.get("EFFICIENTROLLOUT_CUDA_GRAPHS", "0") == "1"


def _mamba_extra_buffer(server_args) -> bool:
    method = getattr(server_args, "enable_mamba_extra_buffer", None)
    if callable(method):  # SGLang 0.5.18
        return bool(method())
    from sglang.srt.runtime_context import get_exec  # 0.5.23: in the resolved config

    return bool(getattr(get_exec().mamba, "enable_mamba_extra_buffer", False))


def derive_draft(layer, weight, apply) -> None:
    """Quantize `weight` into `layer._er_draft`; `apply(x)` is the layer's own (target) forward.
    Once graphs are captured, into the draft's own tensors (the graphs read them)."""
    source = _Source(weight.detach(), getattr(layer, "bias", None), apply)
    draft = QuantLinear(source, _kernel(weight.device, weight.dtype))
    if draft.kernel != "none":
        source.weight = None  # keep no reference to the full-precision copy SGLang repacks next
    if _in_place and hasattr(layer, "_er_draft"):
        try:
            layer._er_draft.copy_(draft)
        except ValueError as exc:  # a graph holds the old tensors: never replace them under it
            log.error("the draft of %s cannot be refreshed in place (%s): speculation off", layer, exc)
            layer._er_draft_broken = True
    else:
        layer._er_draft = draft
    layer._er_draft_stamp = next(_loads)


def _patch_sglang() -> None:
    global _target_apply
    if _target_apply is not None:
        return
    from sglang.srt.layers.logits_processor import LogitsProcessor
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

    load, apply, lm_head = (UnquantizedLinearMethod.process_weights_after_loading, UnquantizedLinearMethod.apply,
                            LogitsProcessor._compute_lm_head)
    _target_apply = apply

    # These run in every SGLang process with this package installed, whatever its algorithm:
    # they pass on any argument a newer SGLang adds (0.5.23's lm head takes `out=`)
    def process_weights_after_loading(self, layer, *args, **kwargs):
        if _enabled() and getattr(layer, "weight", None) is not None and layer.weight.dim() == 2:
            derive_draft(layer, layer.weight, lambda x, method=self, layer=layer: apply(method, layer, x, layer.bias))
        return load(self, layer, *args, **kwargs)

    def apply_draft(self, layer, x, *args, **kwargs):
        draft = getattr(layer, "_er_draft", None) if _drafting else None
        return apply(self, layer, x, *args, **kwargs) if draft is None else draft(x)

    def compute_lm_head(self, hidden_states, head, *args, **kwargs):
        draft = getattr(head, "_er_draft", None) if _drafting else None
        return lm_head(self, hidden_states, head, *args, **kwargs) if draft is None else draft(hidden_states)

    UnquantizedLinearMethod.process_weights_after_loading = process_weights_after_loading
    UnquantizedLinearMethod.apply = apply_draft
    LogitsProcessor._compute_lm_head = compute_lm_head


@contextlib.contextmanager
def _swapped(obj, name: str, value):
    """`obj.name` is `value` inside the block and what it was after it (SGLang's runner reads
    several of its attributes when it builds or runs a step: we set them for one block)."""
    old = getattr(obj, name, None)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def _draft_layers_on():
    """Forwards in this block run the draft: every patched linear uses its int8 copy."""
    global _drafting
    _drafting = True
    try:
        yield
    finally:
        _drafting = False


class _StepGraphs:
    """CUDA graph runners for every step shape the worker runs (see the module docstring)."""

    def __init__(self, model_runner, k_max: int, backends: dict):
        global _in_place
        self.verify = {k_max: None}  # SGLang's own runner (width K_max + 1; it may recapture it after updates)
        for k, backend in sorted(backends.items()):
            with _verify_width(k + 1):
                self.verify[k] = _runner_class()(model_runner, attn_backend=backend, speculative_num_steps=k,
                                                 speculative_num_draft_tokens=k + 1)
        self.plain = _capture_decode(model_runner)
        with _draft_layers_on():
            self.draft = _capture_decode(model_runner)
        _in_place = True  # from now on the graphs hold the drafts' tensors
        log.info("%s: CUDA graphs for plain and draft steps and verifies with K in %s", ALGORITHM, sorted(self.verify))

    def runner(self, step, sglangs):
        """The runner for `step`; `sglangs` is the one SGLang has installed (K_max's verify)."""
        runner = self.plain if step == "plain" else self.draft if step == "draft" else self.verify[step]
        return sglangs if runner is None else runner


def _backend(model_runner, own_workspace: bool = True):
    """A new attention backend of the model runner, built with whatever verify width SGLang's
    config holds now (see _verify_width); with its own workspace where a graph will bake it in
    (FlashInfer's is 384 MiB or more), else sharing the global one (eager steps run in turn)."""
    with _swapped(model_runner, "init_new_workspace", model_runner.init_new_workspace):  # SGLang sets it
        return model_runner._get_attention_backend(init_new_workspace=own_workspace)


@contextlib.contextmanager
def _verify_width(width: int):
    """SGLang's verify width (speculative_num_draft_tokens) set to `width` while a backend or a
    graph runner is built: some read it then (FA3), as SGLang's adaptive EAGLE does per step count."""
    from sglang.srt.runtime_context import get_context, get_spec

    spec = get_spec()
    steps, tokens = spec.speculative_num_steps, spec.speculative_num_draft_tokens
    get_context().override("efficientrollout.verify_width", speculative_num_steps=width - 1, speculative_num_draft_tokens=width)
    try:
        yield
    finally:
        get_context().override("efficientrollout.verify_width", speculative_num_steps=steps, speculative_num_draft_tokens=tokens)


def _capture_decode(model_runner):
    """A DECODE graph runner (one token per request) over SGLang's batch buckets, with its own
    attention backend: SGLang picks TARGET_VERIFY for every runner of a speculative server, so
    the runner is built while the model runner reads as non-speculative."""
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    with _swapped(model_runner, "spec_algorithm", SpeculativeAlgorithm.NONE):
        return _runner_class()(model_runner, attn_backend=_backend(model_runner), speculative_num_steps=0,
                               speculative_num_draft_tokens=1)


_RunnerClass = None


def _runner_class():
    """SGLang's decode graph runner, capturing verifies with our chain input: for a custom
    algorithm SGLang captures them with none, and FlashInfer's capture asserts on that."""
    global _RunnerClass
    if _RunnerClass is None:
        from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode
        from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

        class ChainGraphRunner(DecodeCudaGraphRunner):
            def get_spec_info(self, num_tokens: int):
                if self.capture_forward_mode != ForwardMode.TARGET_VERIFY:
                    return super().get_spec_info(num_tokens)
                width = self.captured_req_width
                device = self.model_runner.device
                seq_lens = torch.full((num_tokens // width,), self.seq_len_fill_value, dtype=torch.int64, device=device)
                info = _chain_input(torch.zeros(num_tokens // width, width, dtype=torch.int64, device=device), seq_lens, width)
                info.capture_hidden_mode = CaptureHiddenMode.NULL
                return info

        _RunnerClass = ChainGraphRunner
    return _RunnerClass


def _speculable(info) -> bool:
    """Whether our verify models this batch's sampling (else it decodes plain)."""
    penalties = info.penalizer_orchestrator is not None and info.penalizer_orchestrator.is_required
    return not (info.grammars or info.logit_bias is not None or info.need_min_p_sampling
                or info.has_custom_logit_processor or penalties)


def _sampling_rows(info, vocab: int):
    """SGLang's per-row sampling parameters as ours."""
    from ..sampling import SamplingBatch

    top_k = info.top_ks.tolist()
    greedy = [k == 1 for k in top_k]  # SGLang serves temperature 0 as top-k 1 at temperature 1
    return SamplingBatch.build(
        [0.0 if g else float(t) for g, t in zip(greedy, info.temperatures.view(-1).tolist())],
        info.top_ps.tolist(), [0 if g or k <= 0 or k >= vocab else int(k) for g, k in zip(greedy, top_k)],
        info.temperatures.device,
    )


def _worker_base():
    from sglang.srt.speculative.base_spec_worker import BaseSpecWorker

    return BaseSpecWorker


class SelfDraftWorker(_worker_base()):
    """SGLang's speculative worker for our algorithm (spec-v2 schema, synchronous)."""

    def __init__(self, server_args, gpu_id, nccl_port, target_worker, ps=None):  # SGLang passes keywords (0.5.23: no ps)
        super().__init__()
        self.server_args = server_args
        self._target_worker = target_worker
        self._draft_worker = None
        self.model_runner = target_worker.model_runner
        self.device = self.model_runner.device
        from sglang.srt.runtime_context import get_spec

        self.k_max = server_args.speculative_num_steps or get_spec().speculative_num_steps  # 0.5.23: the resolved value
        self.stride = self.k_max + 1  # every result is laid out for the longest verify
        self.speculative_num_draft_tokens = self.stride
        mode = os.environ.get("EFFICIENTROLLOUT_SPECULATION", "adaptive")
        k = min(int(os.environ.get("EFFICIENTROLLOUT_SPECULATION_K", 4)), self.k_max)
        self.gate = SpeculationGate(SpeculationConfig(mode=mode, k=k, k_max=self.k_max, probe=False))
        trace = os.environ.get("EFFICIENTROLLOUT_SGLANG_TRACE")
        self.trace = open(trace, "a", buffering=1) if trace else None  # one line per decode step
        self.drafted: dict[str, int] = {}  # per request: SGLang counts K_max per verify, we draft K
        self.enabled = True
        self.stamp = 0
        self.weights_changed = False
        self._wrap_weight_updates()
        self.refresh_drafts()
        self.graphs = None  # ours, captured after SGLang's (init_cuda_graphs)
        self.backends: dict[int, object] = {}  # CUDA: an attention backend per verified K < K_max
        self.cuda = torch.device(self.device).type == "cuda"
        if self.cuda:
            self.model_runner._decode_cuda_graph_runner_cls = _runner_class  # SGLang's own capture: our chain input

    def init_attention_backends(self):
        """SGLang's scheduler calls this after the target's backends: on CUDA, one per verified
        K (EFFICIENTROLLOUT_GRAPH_KS, default 1,2,4; K_max verifies on the target's own)."""
        if self.cuda:
            ks = {int(k) for k in os.environ.get("EFFICIENTROLLOUT_GRAPH_KS", "1,2,4").split(",") if k.strip()}
            for k in sorted(k for k in ks if 0 < k < self.k_max):
                with _verify_width(k + 1):
                    self.backends[k] = _backend(self.model_runner, own_workspace=not self.server_args.disable_cuda_graph)

    def init_cuda_graphs(self):
        """SGLang's scheduler calls this once the target's graphs are captured: ours follow."""
        if not (self.cuda and getattr(self.model_runner, "decode_cuda_graph_runner", None) is not None):
            return
        if not _graphs_wanted():  # SGLang may have captured its own (a K_max + 1 verify) despite handle_server_args
            self.model_runner.decode_cuda_graph_runner = None
            return
        args = self.server_args
        if args.enable_lora or _mamba_extra_buffer(args):  # shared per-width state our extra runners would reset
            log.warning("%s: no CUDA graphs of its own with LoRA or mamba extra buffers; its steps run eagerly", ALGORITHM)
            self.model_runner.decode_cuda_graph_runner = None
            return
        self.graphs = _StepGraphs(self.model_runner, self.k_max, self.backends)

    def _k_for(self, k: int) -> int:
        """On CUDA, the largest verified K (one with its own backend, or K_max) at most `k`."""
        return max((g for g in (*self.backends, self.k_max) if g <= k), default=0) if self.cuda else k

    # ---- the draft's weights ---------------------------------------------------------------

    @property
    def draft_worker(self):
        return None

    def _draft_layers(self):
        return [m for m in self.model_runner.model.modules() if hasattr(m, "_er_draft")]

    def refresh_drafts(self) -> None:
        """Every draft layer derived from the weights now loaded; the LM head here, the linears
        when SGLang processed them (a layer it did not reload is re-derived from its weights)."""
        model = self.model_runner.model
        head = getattr(model, "lm_head", None)
        if head is not None and getattr(head, "weight", None) is not None and not getattr(head, "use_intel_amx_backend", False):
            derive_draft(head, head.weight, lambda x: torch.nn.functional.linear(x, head.weight))
        layers = self._draft_layers()
        if any(getattr(m, "_er_draft_broken", False) for m in layers):
            self.enabled = False
            return
        stale = [m for m in layers if m._er_draft_stamp <= self.stamp and m is not head]
        for layer in stale:
            if getattr(layer, "use_intel_amx_backend", False):  # SGLang's packed layout: no weights to read back
                log.error("draft weights of %s could not be re-derived after a weight update: speculation off", layer)
                self.enabled = False
                return
            derive_draft(layer, layer.weight, lambda x, layer=layer: _target_apply(layer.quant_method, layer, x, layer.bias))
        self.stamp = next(_loads)
        self.weights_changed = False
        if not layers:
            log.error("no layer of %s has a draft copy: speculation off", type(model).__name__)
            self.enabled = False

    def _wrap_weight_updates(self) -> None:
        """Every weight update of the model runner, whichever path SGLang takes, marks the drafts
        for a check before the next step (the scheduler tells spec workers of some paths only)."""
        worker = self

        class NotifyingUpdater:
            def __init__(self, inner):
                self._inner = inner

            def __getattr__(self, name):
                attr = getattr(self._inner, name)
                # 0.5.23's distributed path: load_weights_from_distributed, then end_weight_update
                if not (name.startswith(("update_weights_from", "load_weights_from", "end_weight_update")) and callable(attr)):
                    return attr

                def update(*args, **kwargs):
                    try:
                        return attr(*args, **kwargs)
                    finally:
                        worker.weights_changed = True  # even a failed update may have rolled weights back

                return update

        self.model_runner.weight_updater = NotifyingUpdater(self.model_runner.weight_updater)

    def update_weights_from_disk(self, recv_req):
        self.refresh_drafts()
        return True, "Succeeded to update model weights."

    def update_weights_from_tensor(self, recv_req):
        result = self.target_worker.update_weights_from_tensor(recv_req)
        self.refresh_drafts()
        return result

    # ---- one scheduler step ----------------------------------------------------------------

    def forward_batch_generation(self, batch, on_publish=None, **_):  # 0.5.23 adds pp_proxy_tensors (no pipeline parallelism here)
        if self.weights_changed:
            self.refresh_drafts()
        bs = len(batch.reqs)
        if not batch.forward_mode.is_decode():  # prefill: a plain target forward
            out = self.target_worker.forward_batch_generation(batch)
            return self._result(out.logits_output, out.next_token_ids, out.next_token_ids[:, None],
                                batch.seq_lens.clone(), torch.ones(bs, dtype=torch.int32, device=batch.seq_lens.device),
                                out.can_run_cuda_graph)
        k = self.gate.choose(bs, True, self.k_max) if self.enabled and _speculable(batch.sampling_info) else 0
        k = self._k_for(k)
        t0 = time.perf_counter()
        seq_lens = batch.seq_lens
        self._committed = (seq_lens, batch.seq_lens_cpu)  # KV committed: every position before the root
        slots = batch.req_to_token_pool.req_to_token[
            batch.req_pool_indices[:, None], seq_lens[:, None] + torch.arange(k + 1, device=seq_lens.device)].long()
        roots = torch.tensor([(r.output_ids or r.origin_input_ids)[-1] for r in batch.reqs], dtype=torch.int64,
                             device=seq_lens.device)
        if k == 0:
            logits_output, tokens, cuda_graph = self._plain(batch, roots, slots[:, 0])
            accept_lens = torch.ones(bs, dtype=torch.int32, device=seq_lens.device)
            self._sync()
            seconds = time.perf_counter() - t0
            self.gate.observe_target(bs, seconds)
            self._trace(bs, 0, 0, seconds)
            return self._result(logits_output, tokens, tokens[:, None], seq_lens + 1, accept_lens, cuda_graph)
        params = _sampling_rows(batch.sampling_info, self.model_runner.model_config.vocab_size)
        drafts, draft_probs = self._draft(batch, roots, slots, k, params)
        self._sync()
        t1 = time.perf_counter()
        logits_output, n, emitted, cuda_graph = self._verify(batch, roots, drafts, draft_probs, slots, k, params)
        self._sync()
        t2 = time.perf_counter()
        self.gate.observe_draft(bs, (t1 - t0) / k)
        self.gate.observe_verify(bs, k, t2 - t1)
        for req in batch.reqs:
            self.drafted[req.rid] = self.drafted.get(req.rid, 0) + k
        accepted = int(n.sum())
        self.gate.observe_acceptance(bs, k, accepted, int((n < k).sum()))
        self._trace(bs, k, accepted, t2 - t0, t1 - t0)
        accept_lens = (n + 1).to(torch.int32)
        return self._result(logits_output, emitted.reshape(-1), emitted, seq_lens + accept_lens,
                            accept_lens, cuda_graph, width=k + 1)

    def _plain(self, batch, roots, slots):
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        self._decode_inputs(batch, roots, slots, 1)
        batch.forward_mode = ForwardMode.DECODE
        with self._graph("plain"):
            out = self.target_worker.forward_batch_generation(batch)
        lo = out.logits_output
        if lo.next_token_logprobs is not None:  # spec results carry one row of log-probs per request
            lo.next_token_logprobs = lo.next_token_logprobs.view(-1, 1)
        return lo, out.next_token_ids, out.can_run_cuda_graph

    def _decode_inputs(self, batch, tokens, slots, ahead: int) -> None:
        """The batch as a step over `tokens` into `slots`, with `ahead` tokens past the committed KV."""
        seq_lens, seq_lens_cpu = self._committed
        batch.input_ids, batch.out_cache_loc, batch.spec_info = tokens, slots.contiguous(), None
        batch.seq_lens, batch.seq_lens_cpu = seq_lens + ahead, seq_lens_cpu + ahead
        batch.seq_lens_sum = int(batch.seq_lens_cpu.sum())

    def _draft(self, batch, roots, slots, k, params):
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

        from ..sampling import filtered_probs, inverse_cdf, scaled_logprobs

        tokens, drafts, probs = roots, [], []
        with _draft_layers_on(), self._graph("draft"):
            for j in range(k):
                self._decode_inputs(batch, tokens, slots[:, j], j + 1)
                batch.forward_mode = ForwardMode.DECODE
                forward_batch = ForwardBatch.init_new(batch, self.model_runner, return_hidden_states_before_norm=False)
                logits = self.model_runner.forward(forward_batch).logits_output.next_token_logits.float()
                tokens = logits.argmax(-1)
                if params.any_sampled:
                    q = filtered_probs(scaled_logprobs(logits, params.temperature), params)
                    drawn = inverse_cdf(q, torch.rand(len(tokens), dtype=torch.float64, device=logits.device))
                    tokens = torch.where(params.temperature > 0, drawn, tokens)
                    probs.append(q)
                drafts.append(tokens)
        return torch.stack(drafts, 1), (torch.stack(probs, 1) if probs else None)

    def _verify(self, batch, roots, drafts, draft_probs, slots, k, params):
        from sglang.srt.layers.logprob_processor import compute_spec_logprobs
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        from ..sampling import filtered_probs, scaled_logprobs

        bs, width = len(roots), k + 1
        seq_lens = self._committed[0]
        chain = torch.cat((roots[:, None], drafts), 1)  # [b, K+1]
        self._decode_inputs(batch, chain.reshape(-1), slots.reshape(-1), 0)  # verify extends the committed KV
        batch.forward_mode = ForwardMode.TARGET_VERIFY
        batch.spec_info = _chain_input(chain, seq_lens, width)
        with self._graph(k), self._attention(k):
            out = self.target_worker.forward_batch_generation(batch, is_verify=True)
        logits = out.logits_output.next_token_logits.view(bs, width, -1)
        target_probs = None
        if params.any_sampled:
            rows = params.repeat_rows(width)
            target_probs = filtered_probs(scaled_logprobs(logits.reshape(bs * width, -1), rows.temperature), rows).view(bs, width, -1)
        u = torch.rand(bs, 2 * width - 1, dtype=torch.float64, device=logits.device)
        n, emitted = verify(drafts, draft_probs, target_probs, logits.argmax(-1), params.temperature == 0, u[:, :k], u[:, k:])
        if batch.return_logprob:
            compute_spec_logprobs(batch, out.logits_output, emitted.reshape(-1), chain_stride=width)
        return out.logits_output, n, emitted, out.can_run_cuda_graph

    @contextlib.contextmanager
    def _graph(self, step):
        """The graph runner of `step` ("plain", "draft" or a verify's K) installed for one forward.
        Without our graphs, drafts run eagerly (SGLang's graphs hold the target's weights)."""
        runner = getattr(self.model_runner, "decode_cuda_graph_runner", None)
        if self.graphs is not None:
            runner = self.graphs.runner(step, runner)
        elif step == "draft":
            runner = None
        with _swapped(self.model_runner, "decode_cuda_graph_runner", runner):
            yield

    @contextlib.contextmanager
    def _attention(self, k: int):
        """K's own attention backend installed for one (eager or graph-fallback) verify."""
        backend = self.backends.get(k)
        if backend is not None:
            with _swapped(self.model_runner, "attn_backend", backend):
                yield
            return
        backend = self.model_runner.attn_backend
        if type(backend).__name__ != "IntelAMXAttnBackend":
            yield
            return
        init = backend.init_forward_metadata

        def init_verify(forward_batch):
            """The CPU backend derives a verify's lengths (committed + width) into its metadata,
            but 0.5.18 passes the batch's committed lengths to the extend kernel, which takes
            prefix + extend: the chain then attends to a cut prefix. The batch carries the
            derived lengths too, whichever one a release reads."""
            init(forward_batch)
            if forward_batch.forward_mode.is_target_verify() and getattr(backend, "extend_metadata", None) is not None:
                forward_batch.seq_lens = backend.extend_metadata[0]

        own = vars(backend).get("init_forward_metadata")
        backend.init_forward_metadata = init_verify
        try:
            yield
        finally:
            if own is None:
                del backend.init_forward_metadata  # the class's own again
            else:
                backend.init_forward_metadata = own

    def _result(self, logits_output, next_token_ids, accept_tokens, new_seq_lens, accept_lens, cuda_graph, width=None):
        """A spec-v2 result; `next_draft_input` keeps the fixed layout SGLang filters and merges."""
        from sglang.srt.managers.scheduler import GenerationBatchResult
        from sglang.srt.speculative.ngram_info import NgramVerifyInput

        bs = accept_tokens.shape[0]
        padded = torch.zeros(bs, self.stride, dtype=torch.int64, device=accept_tokens.device)
        padded[:, : accept_tokens.shape[1]] = accept_tokens
        width = width or 1
        return GenerationBatchResult(
            logits_output=logits_output, next_token_ids=next_token_ids, can_run_cuda_graph=cuda_graph, accept_lens=accept_lens,
            new_seq_lens=new_seq_lens,
            next_draft_input=NgramVerifyInput(draft_token_num=self.stride, new_seq_lens=new_seq_lens, accept_tokens=padded.flatten(),
                                              accept_lens=accept_lens),
            speculative_num_draft_tokens=width,
        )

    def _sync(self) -> None:
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize()

    def note_request_finished(self, *, rid: str, natural_stop: bool) -> None:
        drafted = self.drafted.pop(rid, 0)
        if self.trace is not None:
            self.trace.write(json.dumps({"rid": rid, "drafted": drafted}) + "\n")

    def _trace(self, bs: int, k: int, accepted: int, seconds: float, draft_s: float = 0.0) -> None:
        if self.trace is not None:
            self.trace.write(json.dumps({"t": round(time.time(), 4), "batch": bs, "k": k, "accepted": accepted,
                                         "s": round(seconds, 6), "draft_s": round(draft_s, 6)}) + "\n")


_ChainInput = None


def _chain_input(chain, seq_lens, width: int):
    """SGLang's verify input for one chain of `width` tokens per request (no tree: causal masking)."""
    global _ChainInput
    from sglang.srt.speculative.ngram_info import NgramVerifyInput

    if _ChainInput is None:
        class ChainVerifyInput(NgramVerifyInput):
            @property
            def tree_topk(self) -> int:
                return 1

            def generate_attn_arg_prefill(self, *args, **kwargs):  # SGLang's arguments (0.5.23: keyword-only, others)
                """The paged-attention layout of a verify (FlashInfer); no tree mask: a chain is
                causal, as SGLang's capture of a custom algorithm's verify graph assumes."""
                self.custom_mask = torch.empty(0, dtype=torch.bool, device=self.device)
                kv_indices, kv_indptr, qo_indptr, _ = super().generate_attn_arg_prefill(*args, **kwargs)
                return kv_indices, kv_indptr, qo_indptr, None

        _ChainInput = ChainVerifyInput
    positions = (seq_lens[:, None] + torch.arange(width, device=seq_lens.device)).reshape(-1)
    return _ChainInput(draft_token=chain.reshape(-1), positions=positions, draft_token_num=width, new_seq_lens=seq_lens)
