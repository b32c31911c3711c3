"""Dense prediction on AdaptiVision backbones: Segmenter heads, segmentation metrics, a training loop."""
from .metrics import confusion, iou, mean_iou
from .segmenter import LinearDecoder, MaskTransformer, Segmenter
from .train import evaluate_segmenter, train_segmenter

__all__ = ["LinearDecoder", "MaskTransformer", "Segmenter", "confusion", "evaluate_segmenter", "iou", "mean_iou",
           "train_segmenter"]
