"""rsnc-bench: remote-sensing image-text retrieval under noisy correspondence."""

__version__ = "0.1.0"
