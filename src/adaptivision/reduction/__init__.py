"""Token-reduction baselines on the same backbone (DESIGN.md §4), one small module each.

``reduction=`` of the model picks one: ``none`` (dense), ``random`` (:mod:`.random_keep`),
``importance`` (DynamicViT, :mod:`.importance`), ``evit`` (:mod:`.evit`), ``tome``
(:mod:`.tome`) or ``dtc`` (ours, :mod:`adaptivision.layers.dtc`).
"""
from .common import ReducingBlock, convert_block, gather_tokens, keep_assignment
from .evit import EViTBlock, fuse_inattentive
from .importance import ImportanceStage, KeepScorePredictor, PolicyBlock, policy_attention
from .random_keep import RandomKeep
from .tome import ToMeBlock, bipartite_soft_matching

REDUCTIONS = ("none", "random", "importance", "evit", "tome", "dtc")

__all__ = [
    "REDUCTIONS", "EViTBlock", "ImportanceStage", "KeepScorePredictor", "PolicyBlock", "RandomKeep",
    "ReducingBlock", "ToMeBlock", "bipartite_soft_matching", "convert_block", "fuse_inattentive",
    "gather_tokens", "keep_assignment", "policy_attention",
]
