"""The FLAVA model library: typed configs and presets, the three towers, the five pretraining objectives, image
codebooks for MIM targets, safe save/load, and conversion to and from transformers' FLAVA.

Imports no trainer, MLflow or Prefect; transformers is needed only by ``flava.model.hf``.
"""
from flava.model.config import FlavaConfig, LossConfig, ModelSection, preset
from flava.model.pretraining import FlavaForPretraining, FlavaOutput

__all__ = ["FlavaConfig", "FlavaForPretraining", "FlavaOutput", "LossConfig", "ModelSection", "preset"]
