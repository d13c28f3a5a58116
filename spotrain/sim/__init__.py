"""Trace-driven simulation: a replayed spot market drives the real controller, planner and budget."""
