"""Benchmarks of sqlalchemy-cmk: what encryption costs next to plain columns and to a peer.

Run from the repository root::

    python -m benchmarks                 # full run, SQLite and PostgreSQL, N = 10,000
    python -m benchmarks --quick         # N = 1,000, 3 repeats: well under a minute
    python -m benchmarks --db sqlite --json results.json
    python -m benchmarks --profile load  # cProfile of the encrypted load path, by tottime

Every scenario of one run executes in the same process, on the same engine, with the timed
variants interleaved, so the ratios between them are meaningful even when absolute times drift.
See ``docs/performance.md`` for the scenarios, the method and the measured results.
"""
