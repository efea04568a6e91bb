"""What the daemon's clients need before they import gRPC: where the daemon listens by default, and the health
service that says it is ready."""

DEFAULT_ADDRESS = "127.0.0.1:50051"
READINESS_SERVICE = "beastserve.v1.Generation"
