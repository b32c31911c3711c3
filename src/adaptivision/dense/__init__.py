"""Dense prediction on AdaptiVision backbones: Segmenter heads and segmentation metrics."""
from .metrics import confusion, iou, mean_iou
from .segmenter import LinearDecoder, MaskTransformer, Segmenter

__all__ = ["LinearDecoder", "MaskTransformer", "Segmenter", "confusion", "iou", "mean_iou"]
