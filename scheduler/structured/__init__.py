"""Structured output: grammars compiled off the step loop, per-request matchers, per-step token masks."""
