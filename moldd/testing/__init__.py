"""Helpers for moldd's own tests (and for anyone testing code built on moldd)."""
