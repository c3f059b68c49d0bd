"""Adversarial suites: a model-based state machine over ORM paths, and tamper fuzzing.

See docs/testing.md for how they are organised and how to run them long.
"""
