"""busseg_ops.models: the networks the methods train (wiring and shapes; the heavy lifting is in the
ops). Each takes (B, 1, H, W) grayscale and returns a dict: ``pred`` and, on request, its
method's heads (``rep``, ``proj``) and feature maps (docs/methods.md)."""

from .deeplab import ASPP, DeepLabV3Plus, Projector, SegmentationHeads, upsample
from .inputs import GrayToImageNet
from .lanet import CBAM, LANet, LesionAwareNet
from .malunet import MALUNet
from .relation import AdjacentRelationPropagation, CrossLayerRelationAlignment
from .resnet import LoadReport, ResNet, adapt_input_conv, resnet, resnet18, resnet50, resnet101
from .semiseg_caw import (
    IMTL,
    ClassElevateSeg,
    SegClassNet,
    SemiSegCAW,
    WeightGenerationModule,
    imtl_gradient_weights,
    layercam,
)
from .unet import UNet, UNetEncoder
from .unext import UNeXt

__all__ = [
    "ASPP",
    "DeepLabV3Plus",
    "Projector",
    "SegmentationHeads",
    "upsample",
    "CBAM",
    "LANet",
    "LesionAwareNet",
    "MALUNet",
    "AdjacentRelationPropagation",
    "CrossLayerRelationAlignment",
    "GrayToImageNet",
    "LoadReport",
    "ResNet",
    "adapt_input_conv",
    "resnet",
    "resnet18",
    "resnet50",
    "resnet101",
    "ClassElevateSeg",
    "SegClassNet",
    "SemiSegCAW",
    "WeightGenerationModule",
    "IMTL",
    "imtl_gradient_weights",
    "layercam",
    "UNet",
    "UNetEncoder",
    "UNeXt",
]
