"""kha-train: pretraining Mixture-of-Experts language models with knocking-heads attention."""

__version__ = "0.1.0"
