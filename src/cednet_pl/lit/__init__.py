"""LightningModules and optimisation helpers."""

from cednet_pl.lit.classification import ClassificationModule

__all__ = ["ClassificationModule"]
