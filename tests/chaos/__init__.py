"""Chaos tests: real agents on the local provider, faults injected, invariants asserted."""
