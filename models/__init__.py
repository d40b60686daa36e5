"""busseg_ops.models: thin model package (wiring and shapes; the heavy lifting is in the ops).

Backbones: deep-stem ResNet-18/34/50/101 (``resnet``), U-Net. Segmentation: ``DeepLabV3Plus``,
``UNet`` (dict outputs: ``pred`` + on request ``rep``, ``proj``, ``feats``). RA-BUSSeg relation
modules: ``AdjacentRelationPropagation``, ``CrossLayerRelationAlignment``. LA-Net: ``LANet``.
SemiSeg-CAW: ``SegClassNet``, ``ClassElevateSeg``, ``SemiSegCAW``, ``WeightGenerationModule``.
"""

from .deeplab import ASPP, DeepLabV3Plus, Projector, SegmentationHeads, upsample
from .lanet import CBAM, LANet, LesionAwareNet
from .relation import AdjacentRelationPropagation, CrossLayerRelationAlignment
from .resnet import LoadReport, ResNet, resnet, resnet18, resnet50, resnet101
from .semiseg_caw import ClassElevateSeg, SegClassNet, SemiSegCAW, WeightGenerationModule
from .unet import UNet, UNetEncoder

__all__ = [
    "ASPP",
    "DeepLabV3Plus",
    "Projector",
    "SegmentationHeads",
    "upsample",
    "CBAM",
    "LANet",
    "LesionAwareNet",
    "AdjacentRelationPropagation",
    "CrossLayerRelationAlignment",
    "LoadReport",
    "ResNet",
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
]
