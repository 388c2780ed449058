"""Factorization models: CP tensor factorization (more to come: deep matrix, hierarchical)."""
