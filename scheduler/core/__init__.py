"""The engine's ground floor: the state everything reads (request, KV block pool, scheduling policy, stop
rules) and the public parameter and output types. It imports nothing else from the engine but the
configuration and its leaf helpers."""
