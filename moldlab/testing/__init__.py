"""Helpers for moldd's own tests and benchmarks (daemon harness and client, cluster nodes, a throw-away
PostgreSQL, recorder, loop watch, load scaling). Part of the lab: not in the moldd wheel."""
