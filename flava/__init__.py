"""FLAVA pretraining: model library (flava.model) and pipeline stages (data, train, eval, tracking)."""

__version__ = "0.1.0"
