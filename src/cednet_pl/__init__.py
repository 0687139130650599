"""cednet-pl: Lightning + Hydra training framework for CEDNet (arXiv 2302.06052).

Importing the package registers the CEDNet variants with timm.
"""

import cednet_pl.models  # noqa: F401  (registers the timm entry points)

__version__ = "0.1.0"
