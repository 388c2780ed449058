"""implreg: implicit regularization in matrix, tensor and hierarchical tensor factorization."""

__version__ = "0.1.0"
