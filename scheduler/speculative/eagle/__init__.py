"""EAGLE-style draft heads: the head module and its files, and the proposer that drafts with one."""
