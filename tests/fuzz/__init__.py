"""The fuzz harness: one target per reader of a user's file, a seeded mutator, the contract, two lanes.

``tests/test_fuzz.py`` is the quick lane (``make test``); ``python -m tests.fuzz`` (``make fuzz``) the long
one. docs/fuzzing.md describes the contract and holds the reliability table.
"""
