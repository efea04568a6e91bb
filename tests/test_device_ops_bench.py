"""bench/device_ops.py for a few steps: the count leaves the model's forward and the head's proposal out (a step
with nothing else to do launches a handful of operations), counts the loop's bookkeeping, and says where from."""

from __future__ import annotations

from bench.device_ops import main


def test_the_loop_launches_more_than_the_host_verified_way_and_says_where():
    results = {r["mode"]: r for r in main(["--steps", "4", "--modes", "off,eagle-fixed-k,eagle-fixed-k-loop,"
                                           "ngram-fixed-k-loop", "--where"])}
    assert 0 < results["off"]["ops_per_step"] < 20  # the target's forward is one replay on a GPU: not counted
    assert results["eagle-fixed-k"]["ops_per_step"] < 20  # nor is the head's proposal
    assert results["eagle-fixed-k-loop"]["ops_per_step"] > 3 * results["eagle-fixed-k"]["ops_per_step"]
    assert any(line.startswith("worker/shifts.py") for line in results["eagle-fixed-k-loop"]["by_line"])
    assert 0 < results["ngram-fixed-k-loop"]["lookup_ops_per_step"] < results["ngram-fixed-k-loop"]["ops_per_step"]
