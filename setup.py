"""Builds the optional C accelerators of `events.verify` (events/_chainscan.c) and of the read model's bulk fold
(moldd/projection/_foldrows.c); they need gcc, the Python headers, libsqlite3-dev and libssl-dev, all installed
by scripts/install.sh. Everything else is in pyproject.toml.

If it cannot be built the install still succeeds (optional=True) and verify uses its pure-Python scan, which
gives the same reports, only slower; `python -m events verify` prints which one it used with --json
("accelerated"). Likewise the fold without _foldrows reads rows through Python's sqlite3 (same state, slower)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "events._chainscan",
            ["events/_chainscan.c"],
            libraries=["sqlite3", "crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=True,
        ),
        Extension(
            "moldd.projection._foldrows",
            ["moldd/projection/_foldrows.c"],
            libraries=["sqlite3"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=True,
        ),
    ]
)
