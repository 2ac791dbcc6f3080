"""Amodal3R inference in pure PyTorch: occluded-object 3D reconstruction."""

__version__ = "0.1.0"
