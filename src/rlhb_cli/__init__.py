"""rlhb: align language models with real online human behaviour (RLHB, arXiv 2405.00578)."""

__version__ = "0.1.0"
