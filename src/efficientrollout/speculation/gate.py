"""When to speculate and how far: an online cost model and the per-step gate.

Predicted time per emitted token (per row) of a step with draft length K at batch size b:

    K = 0:  T_t(b)
    K > 0:  (K * T_d(b) + T_v(b, K)) / L(alpha, K),   L = (1 - alpha^(K+1)) / (1 - alpha)

T_t(b) is a plain target step, T_d(b) one drafter step, T_v(b, K) the target's verify over K+1
positions per row. All are EMAs the engine measures on every step, keyed by buckets of batch
rows (powers of two and 1.5x them), seeded by a start-up probe, interpolated between buckets.
A verify is keyed by the rows it runs, b * (K+1): its cost is mostly its linears', a function
of rows, so a verify measured at one (b, K) predicts every other with as many rows. (Keyed by b
per K, a K=1 verify the probe never measured was interpolated in K between a plain step and
K=3, ~15% too dear at batch 6-7, and the gate never drafted in a GRPO tail of 6-7 rows where
K=1 pays; SmolLM2 fp32, one core.) alpha is the running per-token acceptance rate. No offline
calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..options import option

MODES = ("plain", "always", "toggle-ladder", "adaptive")
# The drafter's linear kernels (QuantLinear): 8-bit weight-only (torchao, ATen int8pack), 8-bit
# weights and activations (FBGEMM on CPUs; w8a8 int8 and fp8 tensor-core GEMMs), 4-bit weight-only.
DRAFTER_KERNELS = ("torchao", "int8pack", "fbgemm", "w8a8", "fp8", "int4", "int4pack")


@dataclass(slots=True)
class SpeculationConfig:
    mode: str = option("adaptive", "plain | always (fixed --k) | toggle-ladder (the paper's policy) | adaptive (ours)",
                       choices=MODES, flag="--speculation")
    k: int = option(4, "draft length for --speculation always")
    k_max: int = option(8, "adaptive chooses K in 0..k_max per step")
    drafter: str = option("int8", "int8 (torchao, per channel) | int4 (group-wise; CUDA and AVX512 CPUs) | exact (unquantized: tests)",
                          choices=("int8", "int4", "exact"))
    drafter_kernel: str = option("auto", "the drafter's linear kernel: auto (pick_kernel's choice for this device and --drafter) | "
                                 + " | ".join(DRAFTER_KERNELS) + " (overrides --drafter's int8/int4; not with exact)",
                                 choices=("auto", *DRAFTER_KERNELS))
    coupling: str = option("rejection", "rejection: standard speculative sampling (a draft stands with probability "
                           "min(1, p/q)); seeded samples depend on the gate's choices of K | race: every sampled token, "
                           "plain or speculative, is the winner of an exponential race keyed by (seed, position, token), so "
                           "speculation never changes a seeded sample, for about a third of the tail's speed-up (fewer drafts "
                           "stand); the native engine's (SGLang verifies by rejection)", choices=("rejection", "race"))
    int4_group_size: int = option(64, "must divide every layer width (SmolLM2's 576 does not divide by 128)")
    draft_vocab: int = option(0, "N > 0: the drafter's LM head keeps the N tokens finished rollouts emitted most, once it "
                              "has seen N; lossless, and pays off for greedy decoding only (see VocabHead)")
    probe: bool = option(True, "seed the cost model with a start-up probe of a few seconds")
    hysteresis: float = option(0.05, "switch K only if the prediction improves by more than this fraction")
    explore_every: int = option(16, "every N steps try a neighbouring K, so stale estimates refresh")
    explore_margin: float = option(0.1, "... if it is predicted within this fraction of the best")
    ladder: tuple[int, ...] = option((5, 7, 9, 11), "toggle-ladder's draft lengths")
    ladder_up: float = option(0.94, "toggle-ladder moves up the ladder at wave acceptance >= this")
    ladder_down: float = option(0.85, "toggle-ladder moves down at wave acceptance <= this")
    toggle_speedup: float = option(1.05, "toggle-ladder turns on once the predicted speed-up exceeds this")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"speculation mode must be one of {MODES}, got {self.mode!r}")
        if self.drafter not in ("int8", "int4", "exact"):
            raise ValueError(f"drafter must be int8, int4 or exact, got {self.drafter!r}")
        if self.drafter_kernel not in ("auto", *DRAFTER_KERNELS):
            raise ValueError(f"drafter_kernel must be auto or one of {DRAFTER_KERNELS}, got {self.drafter_kernel!r}")
        if self.coupling not in ("race", "rejection"):
            raise ValueError(f"coupling must be rejection or race, got {self.coupling!r}")
        if not 1 <= self.k <= 32 or not 1 <= self.k_max <= 32:
            raise ValueError("k and k_max must be in 1..32")
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be >= 0, got {self.draft_vocab}")


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens emitted per row by a step drafting k tokens at acceptance rate alpha."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def _bucket(n: int) -> int:
    """The nearest (in ratio) of 1, 2, 3, 4, 6, 8, 12, 16, 24, ..."""
    n = max(n, 1)
    e = n.bit_length() - 1
    return min((1 << e, 3 << e >> 1 or 1, 1 << (e + 1)), key=lambda c: abs(math.log(n / c)))


class CostTable:
    """Seconds per forward, as EMAs per power-of-two bucket of n, interpolated between buckets."""

    def __init__(self, decay: float = 0.8):
        self.decay = decay
        self.ema: dict[int, float] = {}

    def observe(self, n: int, seconds: float) -> None:
        b = _bucket(n)
        old = self.ema.get(b)
        self.ema[b] = seconds if old is None else self.decay * old + (1 - self.decay) * seconds

    def measured(self, n: int, span: float = 4.0) -> bool:
        """Whether predict(n) rests on measurements: n's own bucket, or an interpolation between
        measured buckets at most `span` apart in ratio (the start-up probe's 1, 4, 16, 64), not an
        extrapolation or a long interpolation."""
        b = _bucket(n)
        if b in self.ema:
            return True
        lo, hi = [k for k in self.ema if k < b], [k for k in self.ema if k > b]
        return bool(lo and hi) and min(hi) / max(lo) <= span

    def predict(self, n: int) -> float | None:
        if not self.ema:
            return None
        known = sorted(self.ema)
        if n <= known[0]:
            return self.ema[known[0]]
        if n >= known[-1]:  # extrapolate linearly in n from the largest bucket (compute-bound side)
            return self.ema[known[-1]] * n / known[-1]
        hi = next(k for k in known if k >= n)
        lo = max(k for k in known if k <= n)
        if hi == lo:
            return self.ema[lo]
        w = (n - lo) / (hi - lo)
        return (1 - w) * self.ema[lo] + w * self.ema[hi]


class VerifyCosts:
    """T_v(b, K): one CostTable over the rows a verify runs, b * (K+1)."""

    def __init__(self):
        self.rows = CostTable()

    def observe(self, batch: int, k: int, seconds: float) -> None:
        self.rows.observe(batch * (k + 1), seconds)

    def predict(self, batch: int, k: int) -> float | None:
        return self.rows.predict(batch * (k + 1))


class SpeculationGate:
    """Chooses K for each decode step according to the configured mode."""

    def __init__(self, config: SpeculationConfig):
        self.config = config
        self.target = CostTable()
        self.draft = CostTable()
        self.verify = VerifyCosts()
        self.alpha = 0.8  # prior until the first verify
        self.current_k = 0
        self.steps = 0
        self.ladder_index = 0
        self.toggled_on = False
        self.wave_drafted = 0
        self.wave_accepted = 0

    # ---- measurements --------------------------------------------------------------------

    def observe_target(self, batch: int, seconds: float) -> None:
        self.target.observe(batch, seconds)

    def observe_verify(self, batch: int, k: int, seconds: float) -> None:
        self.verify.observe(batch, k, seconds)

    def observe_draft(self, batch: int, seconds: float) -> None:
        self.draft.observe(batch, seconds)

    def observe_acceptance(self, rows: int, k: int, accepted: int, rejected_rows: int) -> None:
        """Geometric model: each row saw `n` accepts then (if n < k) one rejection."""
        if rows == 0 or k == 0:
            return
        estimate = accepted / max(accepted + rejected_rows, 1)
        weight = min(0.5, rows * k / 64)
        self.alpha = (1 - weight) * self.alpha + weight * estimate
        self.wave_drafted += rows * k
        self.wave_accepted += accepted

    # ---- decisions -----------------------------------------------------------------------

    def predicted_cost(self, batch: int, k: int) -> float | None:
        """Predicted seconds per emitted token per row; None while a needed cost is unknown."""
        plain = self.target.predict(batch)
        if k == 0:
            return plain
        d, v = self.draft.predict(batch), self.verify.predict(batch, k)
        if v is None or d is None:
            return None
        return (k * d + v) / expected_tokens(self.alpha, k)

    def best_k(self, batch: int, k_max: int) -> int:
        costs = {k: self.predicted_cost(batch, k) for k in range(k_max + 1)}
        known = {k: c for k, c in costs.items() if c is not None}
        return min(known, key=known.get) if known else 0

    def start_wave(self) -> None:
        self.toggled_on = False
        self.wave_drafted = self.wave_accepted = 0

    def end_wave(self) -> None:
        """toggle-ladder moves along its ladder between waves, by the wave's acceptance."""
        if self.config.mode != "toggle-ladder" or self.wave_drafted == 0:
            return
        rate = self.wave_accepted / self.wave_drafted
        if rate >= self.config.ladder_up:
            self.ladder_index = min(self.ladder_index + 1, len(self.config.ladder) - 1)
        elif rate <= self.config.ladder_down:
            self.ladder_index = max(self.ladder_index - 1, 0)

    def choose(self, batch: int, wave_filled: bool, k_cap: int) -> int:
        """Draft length for the next step (0 = plain). k_cap bounds K (context, token budgets)."""
        cfg = self.config
        self.steps += 1
        if cfg.mode == "plain" or k_cap <= 0:
            return 0
        if cfg.mode == "always":
            return min(cfg.k, k_cap)
        if cfg.mode == "toggle-ladder":
            k = cfg.ladder[self.ladder_index]
            if not self.toggled_on and wave_filled:
                plain, spec = self.predicted_cost(batch, 0), self.predicted_cost(batch, k)
                self.toggled_on = plain is not None and spec is not None and plain / spec > cfg.toggle_speedup
            return min(k, k_cap) if self.toggled_on else 0
        # adaptive
        k_max = min(cfg.k_max, k_cap)
        best = self.best_k(batch, k_max)
        current = min(self.current_k, k_max)
        cur_cost, best_cost = self.predicted_cost(batch, current), self.predicted_cost(batch, best)
        if cur_cost is not None and best_cost is not None and cur_cost <= best_cost * (1 + cfg.hysteresis):
            best = current
        self.current_k = best
        if cfg.explore_every and self.steps % cfg.explore_every == 0:
            probe_k = self._exploration(best, k_max, self.steps // cfg.explore_every)
            if probe_k == 0 and best > 0:
                return 0  # plain's cost is only measured on plain steps: never let it go stale
            if probe_k > 0 and not self.draft.measured(batch):
                return probe_k  # far from any batch size drafted at: predictions here are extrapolations, measure
            probe_cost, best_cost = self.predicted_cost(batch, probe_k), self.predicted_cost(batch, best)
            if probe_cost is None or best_cost is None or probe_cost <= best_cost * (1 + cfg.explore_margin):
                return probe_k
        return best

    @staticmethod
    def _exploration(best: int, k_max: int, n: int) -> int:
        """The K the n-th exploration step refreshes: from K=0 a short draft; while speculating,
        in turn the K below, the K above and plain decoding (whose cost a long speculative
        stretch would otherwise never re-measure, as sequences grow and the batch shrinks)."""
        if best == 0:
            return min(2, k_max)
        return (max(best - 1, 0), min(best + 1, k_max), 0)[n % 3]
