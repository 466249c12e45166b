"""surgery: streaming, out-of-core weight surgery for Mixture-of-Experts checkpoints."""

__version__ = "0.1.0"
