"""ladmim-hf: LADMIM logical anomaly detection as Hugging Face models."""

__version__ = "0.1.0"
