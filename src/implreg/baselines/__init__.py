"""Convex baselines: nuclear-norm minimization for matrix completion and sensing."""
