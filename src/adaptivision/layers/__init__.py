"""One file per layer of the paper's section 3, assembled by ``adaptivision.models``."""
from .afa import AdaptiveFocusAttention, AFABlock, ModulationPredictor, make_afa_block, modulation_matrix
from .cmtf import CrossModalTokenFusion
from .dtc import DynamicTokenClustering, condense, kmeans_pp, soft_assign

__all__ = [
    "AFABlock", "AdaptiveFocusAttention", "CrossModalTokenFusion", "DynamicTokenClustering",
    "ModulationPredictor", "condense", "kmeans_pp", "make_afa_block", "modulation_matrix", "soft_assign",
]
