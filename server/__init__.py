"""The beastserve daemon and its command line."""
