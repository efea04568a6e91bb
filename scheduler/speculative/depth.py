"""Choosing how many tokens to draft each step (k = 0..k_max).

The rule: pick the k that maximises expected tokens per second of the whole step,

    rate(k) = B * E(k) / S_b(k),     E(k) = 1 + c * sum_{j=1..k} prod_{i<=j} a_i

where B is the number of decoding sequences, c the measured share of them the proposer finds
drafts for (n-gram lookups often find none), a_i the measured probability that draft position
i is accepted given that the ones before it were (shared by all loads), and S_b(k) the
measured wall time of an engine step that drafted k tokens per sequence while the batch held
a similar number of decoding sequences (b = the power-of-two bucket of B). Measuring whole
steps keeps every overhead speculation adds (proposing, verifying, the draft's passes) in the
cost. When steps are bound by fixed costs (few sequences, launch overhead) S_b(k) hardly grows
with k and k goes up; under load each draft token costs about what a real one does and k falls
to 0 unless acceptance is very high.

A load bucket first times every depth MIN_SAMPLES times; after that one step in EXPLORE_EVERY tries the
next depth in turn, so the costs follow the load. Costs are exponential moving averages.
"""

from __future__ import annotations

EXPLORE_EVERY = 32
MIN_SAMPLES = 3  # steps timed at each depth, per load bucket, before trusting the averages
COST_SMOOTHING = 0.2  # weight of the newest step in S_b(k)
ACCEPT_DECAY = 0.999  # per observed draft position


class AdaptiveDepth:
    def __init__(self, k_max: int, fixed: bool = False):
        """fixed=True always drafts k_max (for measurements and tests)."""
        self.k_max = k_max
        self.fixed = fixed
        self.step_seconds: dict[int, list[float | None]] = {}  # bucket -> S_b(k) for k = 0..k_max
        self.samples: dict[int, list[int]] = {}  # bucket -> steps timed at each k
        self.attempts = [1.0] * k_max  # a weak prior: half of the drafts accepted
        self.accepts = [0.5] * k_max
        self.coverage = 1.0
        self.num_steps = 0
        self.explore_k = 0

    def acceptance(self) -> list[float]:
        return [a / n for a, n in zip(self.accepts, self.attempts)]

    def expected_tokens(self, k: int) -> float:
        extra, survive = 0.0, 1.0
        for alpha in self.acceptance()[:k]:
            survive *= alpha
            extra += survive
        return 1.0 + self.coverage * extra

    def choose(self, num_decodes: int, num_prefill_tokens: int = 0) -> int:
        if self.fixed:
            return self.k_max
        if num_decodes == 0:
            return 0  # nothing to draft for
        costs = self._costs(num_decodes)
        samples = self.samples[num_decodes.bit_length()]
        fewest = min(range(self.k_max + 1), key=samples.__getitem__)
        if samples[fewest] < MIN_SAMPLES:
            return fewest
        self.num_steps += 1
        if self.num_steps % EXPLORE_EVERY == 0:
            self.explore_k = (self.explore_k + 1) % (self.k_max + 1)
            return self.explore_k
        rates = [self.expected_tokens(k) / seconds for k, seconds in enumerate(costs)]
        return max(range(self.k_max + 1), key=rates.__getitem__)

    def observe_step(self, num_decodes: int, k: int, seconds: float) -> None:
        if num_decodes == 0 or self.fixed:
            return
        costs = self._costs(num_decodes)
        samples = self.samples[num_decodes.bit_length()]
        samples[k] += 1
        # A plain mean over the first samples, then an exponential moving average.
        weight = max(COST_SMOOTHING, 1 / samples[k])
        costs[k] = seconds if costs[k] is None else (1 - weight) * costs[k] + weight * seconds

    def observe_coverage(self, num_with_drafts: int, num_speculating: int) -> None:
        if num_speculating:
            self.coverage = 0.9 * self.coverage + 0.1 * num_with_drafts / num_speculating

    def observe_acceptance(self, num_drafts: int, num_accepted: int) -> None:
        """Position i was tried when every earlier one was accepted."""
        for i in range(min(num_drafts, num_accepted + 1)):
            self.attempts[i] = ACCEPT_DECAY * self.attempts[i] + 1
            self.accepts[i] = ACCEPT_DECAY * self.accepts[i] + (1 if i < num_accepted else 0)

    def _costs(self, num_decodes: int) -> list[float | None]:
        bucket = num_decodes.bit_length()
        self.samples.setdefault(bucket, [0] * (self.k_max + 1))
        return self.step_seconds.setdefault(bucket, [None] * (self.k_max + 1))
