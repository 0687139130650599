"""DataModules: embedded digits (classification default) and ImageFolder/ImageNet."""

from cednet_pl.data.digits import DigitsDataModule
from cednet_pl.data.imagenet import ImageNetDataModule

__all__ = ["DigitsDataModule", "ImageNetDataModule"]
