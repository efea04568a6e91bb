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

Depths are searched by climbing: a new load bucket starts at k = 0 (never worse than no
speculation) and probes the neighbouring depths, one step in PROBE_EVERY until each has
MIN_SAMPLES timed steps; it moves to a neighbour that measures better. After that one step in
EXPLORE_EVERY re-times a neighbour of the best depth, so the costs follow the load. Probing only
neighbours keeps exploration cheap: a step one depth away costs little more than the best one.
Costs are means over the first samples, then exponential moving averages.
"""

from __future__ import annotations

EXPLORE_EVERY = 32
PROBE_EVERY = 4
MIN_SAMPLES = 3  # steps timed at a depth, per load bucket, before trusting its average
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
        self.bucket_steps: dict[int, int] = {}
        self.explore_k = 0

    def acceptance(self) -> list[float]:
        return [a / n for a, n in zip(self.accepts, self.attempts)]

    def expected_tokens(self, k: int) -> float:
        extra, survive = 0.0, 1.0
        for alpha in self.acceptance()[:k]:
            survive *= alpha
            extra += survive
        return 1.0 + self.coverage * extra

    def choose(self, num_decodes: int) -> int:
        if self.fixed:
            return self.k_max
        if num_decodes == 0:
            return 0  # nothing to draft for
        costs = self._costs(num_decodes)
        bucket = num_decodes.bit_length()
        samples = self.samples[bucket]
        step = self.bucket_steps[bucket] = self.bucket_steps.get(bucket, 0) + 1
        tried = [k for k in range(self.k_max + 1) if samples[k]]
        if not tried:
            return 0
        best = max(tried, key=lambda k: self.expected_tokens(k) / costs[k])
        neighbours = [k for k in (best + 1, best - 1) if 0 <= k <= self.k_max]
        unsure = [k for k in neighbours if samples[k] < MIN_SAMPLES]
        if unsure and step % PROBE_EVERY == 0:
            return unsure[0]
        if step % EXPLORE_EVERY == 0:
            self.explore_k += 1
            return neighbours[self.explore_k % len(neighbours)]
        return best

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
