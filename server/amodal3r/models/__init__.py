"""The models under their official class names, one file per family, and strict checkpoint loading."""

from ._checkpoints import build_model, for_inference, load_model, model_class

__all__ = ["build_model", "for_inference", "load_model", "model_class"]
