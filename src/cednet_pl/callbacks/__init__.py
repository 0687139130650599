"""Lightning callbacks of the analysis (opt-in through ``conf/callbacks/analysis.yaml``); all read-only."""

from cednet_pl.callbacks.gradients import GradientRegions
from cednet_pl.callbacks.panels import Panels
from cednet_pl.callbacks.quality import DetectionQuality

__all__ = ["DetectionQuality", "GradientRegions", "Panels"]
