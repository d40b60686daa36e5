"""busseg_ops.models: thin model package (wiring and shapes; the heavy lifting is in the ops).

Backbones: ResNet-18/34/50/101 (``resnet``; deep U2PL stem, or the torchvision/timm stems, loading
local ImageNet state dicts), U-Net. ``GrayToImageNet``: the gray → ImageNet-normalised RGB step a
3-channel network built with ``gray_input=True`` runs first. Segmentation: ``DeepLabV3Plus``,
``UNet``, ``MALUNet``, ``UNeXt`` (dict outputs: ``pred`` + on request ``rep``, ``proj``, ``feats``). RA-BUSSeg relation
modules: ``AdjacentRelationPropagation``, ``CrossLayerRelationAlignment``. LA-Net: ``LANet``.
SemiSeg-CAW: ``SegClassNet``, ``ClassElevateSeg``, ``SemiSegCAW``, ``WeightGenerationModule``.
"""

from .deeplab import ASPP, DeepLabV3Plus, Projector, SegmentationHeads, upsample
from .inputs import GrayToImageNet
from .lanet import CBAM, LANet, LesionAwareNet
from .malunet import MALUNet
from .relation import AdjacentRelationPropagation, CrossLayerRelationAlignment
from .resnet import LoadReport, ResNet, adapt_input_conv, resnet, resnet18, resnet50, resnet101
from .semiseg_caw import ClassElevateSeg, SegClassNet, SemiSegCAW, WeightGenerationModule
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
    "UNet",
    "UNetEncoder",
    "UNeXt",
]
