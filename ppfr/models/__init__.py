"""Backbones and margin heads shared by the methods (METHODS.md §1.3, §1.4, §3.3, §5.2, §6.3)."""

from ppfr.models.heads import ArcFaceHead, CosFaceHead, MarginHead, ShardedMarginHead
from ppfr.models.ir import IRNet, ir_net
from ppfr.models.mobilefacenet import ClientMobileFaceNet, MobileFaceNet
from ppfr.models.pfld import PFLDInference
from ppfr.models.unet import UNet

__all__ = [
    "ArcFaceHead", "ClientMobileFaceNet", "CosFaceHead", "IRNet", "MarginHead", "MobileFaceNet", "PFLDInference",
    "ShardedMarginHead", "UNet", "ir_net",
]  # fmt: skip
