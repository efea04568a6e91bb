"""Choosing how many tokens to draft each step (k = 0..k_max).

The rule: pick the k that maximises expected tokens per second of the whole step,

    rate(k) = B * E(k) / S(B, P, k),     E(k) = 1 + sum_{j=1..k} prod_{i<=j} a_i

where B is the number of decoding sequences, P the prompt tokens sharing the step, a_i the
measured probability that draft position i is accepted given that the ones before it were,
and S the measured wall time of an engine step, fitted (ridge least squares, exponentially
forgotten) on every step as

    S = c0 + c1 * P + c2 * B + c3 * B * k + c4 * k + c5 * B * [k > 0]

c3 is what each verified draft token costs (target compute and verification), c4 the fixed
cost of each draft pass, c5 the per-sequence cost of proposing. Measuring the whole step, not
just the forward pass, keeps every overhead speculation adds in the model. When steps are
bound by fixed costs (few sequences, launch overhead) extra tokens ride along almost free and
k grows; under load c3 * B * k dominates and k drops to 0 unless acceptance is very high.

The fit needs steps at several depths: the first steps cycle through 0..k_max, and afterwards
one step in EXPLORE_EVERY tries the next depth in turn, so the estimates follow the load.
"""

from __future__ import annotations

import numpy as np

EXPLORE_EVERY = 32
DECAY = 0.99  # per step; about the last 100 steps matter
RIDGE = 1e-6


class StepCostModel:
    """S(B, P, k) by exponentially weighted ridge regression on the features above."""

    def __init__(self):
        self.xtx = np.zeros((6, 6))
        self.xty = np.zeros(6)
        self.weight = 0.0
        self.coef: np.ndarray | None = None

    @staticmethod
    def features(num_decodes: int, num_prefill: int, k: int) -> np.ndarray:
        return np.array([1.0, num_prefill, num_decodes, num_decodes * k, k, num_decodes * (k > 0)])

    def observe(self, num_decodes: int, num_prefill: int, k: int, seconds: float) -> None:
        x = self.features(num_decodes, num_prefill, k)
        self.xtx = DECAY * self.xtx + np.outer(x, x)
        self.xty = DECAY * self.xty + x * seconds
        self.weight = DECAY * self.weight + 1
        self.coef = None

    def __call__(self, num_decodes: int, num_prefill: int, k: int) -> float:
        if self.coef is None:
            self.coef = self._fit()
        return max(1e-6, float(self.features(num_decodes, num_prefill, k) @ self.coef))

    def _fit(self) -> np.ndarray:
        """Least squares with every coefficient >= 0 (each feature can only add time): refit
        without the features that come out negative until none does."""
        active = np.ones(6, dtype=bool)
        coef = np.zeros(6)
        while active.any():
            idx = np.flatnonzero(active)
            sub = self.xtx[np.ix_(idx, idx)] + RIDGE * self.weight * np.eye(len(idx))
            solution = np.linalg.solve(sub, self.xty[idx])
            if (solution >= 0).all():
                coef[idx] = solution
                return coef
            active[idx[solution < 0]] = False
        return coef


class AdaptiveDepth:
    def __init__(self, k_max: int, fixed: bool = False):
        """fixed=True always drafts k_max (for measurements and tests)."""
        self.k_max = k_max
        self.fixed = fixed
        self.cost = StepCostModel()
        self.attempts = [1.0] * k_max  # a weak prior: half of the drafts accepted
        self.accepts = [0.5] * k_max
        self.num_steps = 0
        self.explore_k = 0

    def acceptance(self) -> list[float]:
        return [a / n for a, n in zip(self.accepts, self.attempts)]

    def expected_tokens(self, k: int) -> float:
        expected, survive = 1.0, 1.0
        for alpha in self.acceptance()[:k]:
            survive *= alpha
            expected += survive
        return expected

    def choose(self, num_decodes: int, num_prefill_tokens: int) -> int:
        if self.fixed:
            return self.k_max
        if num_decodes == 0:
            return 0  # nothing to draft for; recording k = 0 keeps the fit honest
        self.num_steps += 1
        if self.num_steps <= 4 * (self.k_max + 1):  # warm-up: every depth a few times
            return self.num_steps % (self.k_max + 1)
        if self.num_steps % EXPLORE_EVERY == 0:
            self.explore_k = (self.explore_k + 1) % (self.k_max + 1)
            return self.explore_k
        rates = [num_decodes * self.expected_tokens(k) / self.cost(num_decodes, num_prefill_tokens, k)
                 for k in range(self.k_max + 1)]
        return int(np.argmax(rates))

    def observe_step(self, num_decodes: int, num_prefill: int, k: int, seconds: float) -> None:
        self.cost.observe(num_decodes, num_prefill, k, seconds)

    def observe_acceptance(self, num_drafts: int, num_accepted: int) -> None:
        """Position i was tried when every earlier one was accepted."""
        for i in range(min(num_drafts, num_accepted + 1)):
            self.attempts[i] = 0.999 * self.attempts[i] + 1
            self.accepts[i] = 0.999 * self.accepts[i] + (1 if i < num_accepted else 0)
