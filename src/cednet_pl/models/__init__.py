"""CEDNet models (framework-free: torch, timm, torchvision only).

Importing this package registers the CEDNet variants and the MSG-Transformer baselines with timm
(``timm.create_model("cednet_next_tiny")``, ``timm.create_model("msg_tiny")``).
"""

from cednet_pl.models.blocks import FAMILIES, BlockFamily, LayerNorm2d, get_family, register_family
from cednet_pl.models.cednet import CEDNet, checkpoint_filter_fn
from cednet_pl.models.checkpoint import load_checkpoint_file
from cednet_pl.models.complexity import count_macs, count_params
from cednet_pl.models.msg import MSGTransformer, msg_checkpoint_filter_fn
from cednet_pl.models.revcol import RevCol, revcol_checkpoint_filter_fn

__all__ = [
    "FAMILIES",
    "BlockFamily",
    "CEDNet",
    "LayerNorm2d",
    "MSGTransformer",
    "RevCol",
    "checkpoint_filter_fn",
    "count_macs",
    "count_params",
    "get_family",
    "load_checkpoint_file",
    "msg_checkpoint_filter_fn",
    "register_family",
    "revcol_checkpoint_filter_fn",
]
