"""A draft model as proposer: its loading, its compact format, its CUDA graphs."""
