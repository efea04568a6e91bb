"""The daemon's own OpenAI-compatible HTTP API (with vLLM's extensions), over the same engine calls, validation and
metrics as the gRPC services: protocol.py (requests), convert.py (requests into engine inputs), generation.py and
responses.py (engine outputs into answers), errors.py (statuses), routes.py (endpoints), app.py (the server)."""
