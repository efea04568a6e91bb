"""Choosing how many tokens to draft each step (k = 0..k_max).

The rule: pick the k that maximises expected accepted tokens per second of the step,

    rate(k) = B * E(k) / (T(P + B * (1 + k)) + D(k, B)),   E(k) = 1 + sum_{j=1..k} prod_{i<=j} a_i

where B is the number of decoding sequences, P the prefill tokens sharing the step, a_i the
measured probability that draft position i is accepted given the ones before it were,
T(n) = t0 + t1 * n the measured cost of a target forward over n tokens, and D(k, B) =
k * (d0 + d1 * B) the measured cost of drafting. When a step is cheap next to its fixed cost
(few sequences, a big model), extra verification tokens ride along almost free and k grows;
under load T is dominated by t1 * n, each draft token costs as much as a real one, and k drops
to 0 unless acceptance is very high. Every measurement decays, so the choice follows the load.
While k = 0 is chosen, one step in EXPLORE_EVERY still drafts a single token so the acceptance
estimate stays current.
"""

from __future__ import annotations

EXPLORE_EVERY = 64
DECAY = 0.98  # per observation; about the last 50 steps matter


class LinearCost:
    """Exponentially weighted least-squares fit of seconds = c0 + c1 * x."""

    def __init__(self):
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def observe(self, x: float, seconds: float) -> None:
        self.w, self.sx, self.sy = DECAY * self.w + 1, DECAY * self.sx + x, DECAY * self.sy + seconds
        self.sxx, self.sxy = DECAY * self.sxx + x * x, DECAY * self.sxy + x * seconds

    @property
    def ready(self) -> bool:
        return self.w >= 4

    def __call__(self, x: float) -> float:
        mean_x, mean_y = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mean_x**2
        slope = max(0.0, (self.sxy / self.w - mean_x * mean_y) / var) if var > 1e-9 else 0.0
        return max(1e-6, mean_y + slope * (x - mean_x))


class AdaptiveDepth:
    def __init__(self, k_max: int, fixed: bool = False):
        """fixed=True always drafts k_max (for measurements and tests)."""
        self.k_max = k_max
        self.fixed = fixed
        self.target_cost = LinearCost()  # by tokens in the forward pass
        self.draft_cost = LinearCost()  # by sequences in one draft forward
        self.attempts = [1.0] * k_max  # a weak prior: half of the drafts accepted
        self.accepts = [0.5] * k_max
        self.steps_without = 0

    def acceptance(self) -> list[float]:
        return [a / n for a, n in zip(self.accepts, self.attempts)]

    def choose(self, num_decodes: int, num_prefill_tokens: int) -> int:
        if self.fixed or not self.target_cost.ready or num_decodes == 0:
            return self.k_max
        alphas = self.acceptance()
        best_k, best_rate, expected, survive = 0, 0.0, 1.0, 1.0
        for k in range(self.k_max + 1):
            if k:
                survive *= alphas[k - 1]
                expected += survive
            seconds = self.target_cost(num_prefill_tokens + num_decodes * (1 + k))
            if k and self.draft_cost.ready:
                seconds += k * self.draft_cost(num_decodes)
            rate = num_decodes * expected / seconds
            if rate > best_rate:
                best_k, best_rate = k, rate
        self.steps_without = self.steps_without + 1 if best_k == 0 else 0
        if self.steps_without >= EXPLORE_EVERY:
            self.steps_without = 0
            return 1
        return best_k

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        self.target_cost.observe(num_tokens, seconds)

    def observe_draft(self, num_seqs: int, seconds_per_forward: float) -> None:
        self.draft_cost.observe(num_seqs, seconds_per_forward)

    def observe_acceptance(self, num_drafts: int, num_accepted: int) -> None:
        """Position i was tried when every earlier one was accepted."""
        for i in range(min(num_drafts, num_accepted + 1)):
            self.attempts[i] = DECAY * self.attempts[i] + 1
            self.accepts[i] = DECAY * self.accepts[i] + (1 if i < num_accepted else 0)
