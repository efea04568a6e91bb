"""Choosing how many tokens to draft each step (k = 0..k_max).

The rule: pick the k that maximises expected tokens per second of the whole step,

    rate(k) = B * E(k) / S_b(k),     E(k) = 1 + c * sum_{j=1..k} prod_{i<=j} a_i

where B is the number of decoding sequences, c the measured share of them the proposer finds
drafts for (n-gram lookups often find none), a_i the measured probability that draft position
i is accepted given that the ones before it were (shared by all loads), and S_b(k) the wall
time of an engine step that drafts k tokens per sequence while the batch holds a similar number
of decoding sequences (b = the power-of-two bucket of B) and, like it, does or does not carry
prompt chunks (such steps cost more, and differently: they are their own buckets). Measuring
whole steps keeps every overhead speculation adds (proposing, verifying, the draft's passes) in
the cost.

S_b(k) follows a cost model, "a fixed cost for speculating at all, plus a cost per draft token":

    S_b(0) measured,     S_b(k) = S_b(0) + F_b + k * P_b   for k >= 1,

with F_b and P_b fitted (least squares, each depth weighted by its timed steps) to the depths
timed in the bucket. Every k is evaluated with the model, including depths never tried, so the
search is not a climb between neighbours: a fixed cost that makes k = 1 lose to k = 0 does not
hide a k = 4 that wins. While the fit rests on fewer than two timed depths >= 1, untried depths
get the most optimistic costs the timings allow (F_b, P_b >= 0): with none timed, S_b(k) =
S_b(0); with one depth j timed, the extra cost S_b(j) - S_b(0) is taken as all per-token below
j and all fixed above it. So a new bucket times k = 0 (MIN_SAMPLES steps), then k_max, then a
smaller depth if the optimistic costs rate one above k_max; once two depths >= 1 are timed, the
fit is exact for costs of that shape.

The depth the model rates best is taken; while it has fewer than MIN_SAMPLES timed steps, it is
probed, and a probe runs to MIN_SAMPLES steps before anything is decided from it. A settled choice
stands for HOLD_STEPS steps before the model is worked out again, so a step pays a dictionary look-up
for its depth, not the model (tens of microseconds), whether it speculates or not. Once settled,
about one step in EXPLORE_EVERY (fewer when the explored depth is slow: the gap grows with its
cost) re-times another depth (k = 0 every other time, else 1, k_max and the best's neighbours in
turn), so the fit follows the load: under 2% of steps and under 2% of the time. While even free
drafts would not repay (E(k_max) < 1 + MARGIN: few found, fewer accepted), only k = 1 is re-timed, and
HOPELESS_WAIT times less often: its acceptance is all that could change the choice. When speculation does not pay
(steps under load, low acceptance) the model rates k = 0 best and finding that out costs a few
probe steps per bucket. A depth k >= 1 is taken only when its rate beats k = 0's by MARGIN:
the costs are measured, with noise, and a wrong step towards speculating costs more than a
missed gain of a few percent.

A depth's cost starts as the least of its first MIN_SAMPLES timed steps, then follows an
exponential moving average over steps clipped at OUTLIER times the average. Starting low is on
purpose: an estimate too low gets the depth chosen, and the steps it then runs raise it at once,
while one too high (a step that paid for a stall, or a draft model catching up after steps
without drafts) would keep the depth from being chosen, and so re-timed, for a long time.
"""

from __future__ import annotations

EXPLORE_EVERY = 64
HOLD_STEPS = 16  # a settled choice stands this many steps (or to the next re-timing) before it is worked out again
HOPELESS_WAIT = 4  # re-timings come this many times less often while no depth could pay
HOLD_DRIFT = 0.05  # ... unless the share of sequences whose first draft is accepted moves this much
MIN_SAMPLES = 3  # steps timed at a depth, per load bucket, before trusting its average
MARGIN = 0.03  # least gain in expected tokens per second for a depth k >= 1 over k = 0
COST_SMOOTHING = 0.2  # weight of the newest step in S_b(k)
OUTLIER = 1.5  # once a depth's average is trusted, a step counts as at most this many times it
ACCEPT_DECAY = 0.999  # per observed draft position


class AdaptiveDepth:
    def __init__(self, k_max: int, fixed: bool = False):
        """fixed=True always drafts k_max (for measurements and tests)."""
        self.k_max = k_max
        self.fixed = fixed
        self.step_seconds: dict[tuple, list[float | None]] = {}  # bucket -> measured S_b(k) for k = 0..k_max
        self.samples: dict[tuple, list[int]] = {}  # bucket -> steps timed at each k
        self.attempts = [1.0] * k_max  # a weak prior: half of the drafts accepted
        self.accepts = [0.5] * k_max
        self.coverage = 1.0
        self.bucket_steps: dict[tuple, int] = {}
        self.next_explore: dict[tuple, int] = {}  # bucket -> step that re-times a depth other than the best
        self.held: dict[tuple, tuple[int, int]] = {}  # bucket -> (settled depth, step it stands until)
        self.explore_k = 0

    def acceptance(self) -> list[float]:
        return [a / n for a, n in zip(self.accepts, self.attempts)]

    def expected_tokens(self, k: int) -> float:
        extra, survive = 0.0, 1.0
        for alpha in self.acceptance()[:k]:
            survive *= alpha
            extra += survive
        return 1.0 + self.coverage * extra

    def choose(self, num_decodes: int, prefill: bool = False) -> int:
        """The depth for a step with num_decodes decoding sequences; prefill: it will carry prompt chunks."""
        if self.fixed:
            return self.k_max
        if num_decodes == 0:
            return 0  # nothing to draft for
        bucket = _bucket(num_decodes, prefill)
        step = self.bucket_steps[bucket] = self.bucket_steps.get(bucket, 0) + 1
        held = self.held.get(bucket)
        if held is not None and step < held[1] and abs(self._drafting() - held[2]) < HOLD_DRIFT:
            return held[0]  # most steps: the model is worked out again every HOLD_STEPS, not every step
        costs = self.model_costs(num_decodes, prefill)
        samples = self.samples[bucket]
        if costs is None or samples[0] < MIN_SAMPLES:
            return 0  # S_b(0) comes first: never worse than no speculation
        # A probe runs to MIN_SAMPLES steps: one slow step (a pause, a neighbour's burst) must not rule a depth out.
        probing = [k for k in range(1, self.k_max + 1) if 0 < samples[k] < MIN_SAMPLES]
        if probing:
            return probing[0]
        rates = [self.expected_tokens(k) / costs[k] for k in range(self.k_max + 1)]
        best = max(range(self.k_max + 1), key=lambda k: rates[k])
        if rates[best] < (1 + MARGIN) * rates[0]:
            best = 0
        if samples[best] < MIN_SAMPLES:
            return best
        if step < self.next_explore.get(bucket, EXPLORE_EVERY):
            self.held[bucket] = best, min(step + HOLD_STEPS, self.next_explore.get(bucket, EXPLORE_EVERY)), \
                self._drafting()
            return best
        others = [k for k in dict.fromkeys((1, self.k_max, best - 1, best + 1)) if 1 <= k <= self.k_max and k != best]
        # When even free drafts would not repay (few found, fewer accepted), no cost re-timed can change the
        # choice: only whether drafts start to be accepted can, and the cheapest depth tells that, less often.
        hopeless = best == 0 and self.expected_tokens(self.k_max) < 1 + MARGIN
        if hopeless:
            others = others[:1]
        self.explore_k += 1
        if best != 0 and (self.explore_k % 2 or not others):
            k = 0  # every other time: S_b(0) is what speculating at all is weighed against
        elif others:
            k = others[(self.explore_k // 2) % len(others)]
        else:
            return best
        # The next re-timing waits in proportion to this one's cost, so exploring never takes more
        # than 1 / EXPLORE_EVERY of the time, however slow the explored depth is.
        self.next_explore[bucket] = step + round(EXPLORE_EVERY * max(1.0, costs[k] / costs[best])
                                                 * (HOPELESS_WAIT if hopeless else 1))
        return k

    def model_costs(self, num_decodes: int, prefill: bool = False) -> list[float] | None:
        """S_b(k) for every k from the cost model; None until S_b(0) is timed."""
        measured, samples = self._costs(num_decodes, prefill), self.samples[_bucket(num_decodes, prefill)]
        if measured[0] is None:
            return None
        timed = [(k, measured[k] - measured[0], samples[k]) for k in range(1, self.k_max + 1) if samples[k]]
        return [measured[0]] + [measured[0] + max(0.0, _extra_cost(timed, k)) for k in range(1, self.k_max + 1)]

    def observe_step(self, num_decodes: int, k: int, seconds: float, prefill: bool = False) -> None:
        if num_decodes == 0 or self.fixed:
            return
        costs = self._costs(num_decodes, prefill)
        samples = self.samples[_bucket(num_decodes, prefill)]
        samples[k] += 1
        if costs[k] is None or samples[k] <= MIN_SAMPLES:
            costs[k] = seconds if costs[k] is None else min(costs[k], seconds)  # the least of the first
        else:
            seconds = min(seconds, OUTLIER * costs[k])  # a stall says nothing about the depth
            costs[k] = (1 - COST_SMOOTHING) * costs[k] + COST_SMOOTHING * seconds

    def observe_coverage(self, num_with_drafts: int, num_speculating: int) -> None:
        if num_speculating:
            self.coverage = 0.9 * self.coverage + 0.1 * num_with_drafts / num_speculating

    def observe_acceptance(self, num_drafts: int, num_accepted: int) -> None:
        """Position i was tried when every earlier one was accepted."""
        for i in range(min(num_drafts, num_accepted + 1)):
            self.attempts[i] = ACCEPT_DECAY * self.attempts[i] + 1
            self.accepts[i] = ACCEPT_DECAY * self.accepts[i] + (1 if i < num_accepted else 0)

    def _drafting(self) -> float:
        """The expected share of sequences whose first draft stands: a held choice is worked out again as soon as
        it moves by HOLD_DRIFT (drafts stop being found or accepted)."""
        return self.coverage * self.accepts[0] / self.attempts[0] if self.k_max else 0.0

    def _costs(self, num_decodes: int, prefill: bool) -> list[float | None]:
        bucket = _bucket(num_decodes, prefill)
        self.samples.setdefault(bucket, [0] * (self.k_max + 1))
        return self.step_seconds.setdefault(bucket, [None] * (self.k_max + 1))


def _bucket(num_decodes: int, prefill: bool) -> tuple[int, bool]:
    return num_decodes.bit_length(), prefill


def _extra_cost(timed: list[tuple[int, float, int]], k: int) -> float:
    """F + k * P fitted to (depth, S(depth) - S(0), weight) points of depths >= 1; with fewer than
    two depths, the lowest extra cost those points allow for F, P >= 0."""
    if not timed:
        return 0.0
    if len(timed) == 1:
        depth, extra, _ = timed[0]
        return extra * min(k, depth) / depth
    total = sum(w for _, _, w in timed)
    mean_k = sum(d * w for d, _, w in timed) / total
    mean_extra = sum(e * w for _, e, w in timed) / total
    spread = sum(w * (d - mean_k) ** 2 for d, _, w in timed)
    per_token = max(0.0, sum(w * (d - mean_k) * (e - mean_extra) for d, e, w in timed) / spread)
    return mean_extra + per_token * (k - mean_k)
