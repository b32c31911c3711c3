"""Token-reduction baselines on the same backbone (DESIGN.md §4), one small module each.

``reduction=`` of the model picks one: ``none`` (dense), ``random`` (:mod:`.random_keep`),
``importance`` (DynamicViT, :mod:`.importance`), ``evit`` (:mod:`.evit`), ``tome``
(:mod:`.tome`), ``hourglass`` (:mod:`.hourglass`), ``hired`` (:mod:`.hired`), ``tofe`` (:mod:`.tofe`) or ``dtc`` (ours, :mod:`adaptivision.layers.dtc`).

Each file has ``attach(blocks, opts, dim, num_prefix)``: it converts the blocks it reduces in
(``forward_group``) and returns its stages before blocks (``forward_groups``), by block index; a
new baseline is one file and one line of ``ATTACH`` (the protocol: :mod:`adaptivision.layers.tokens`).
"""
from . import evit, hired, hourglass, importance, random_keep, tofe, tome
from .common import ReducingBlock, convert_block, gather_tokens, keep_assignment, keep_tokens
from .evit import EViTBlock, SaliencyBlock, fuse_inattentive
from .hired import HiREDBlock
from .hourglass import HourglassStage
from .importance import ImportanceStage, KeepScorePredictor, PolicyBlock, policy_attention
from .random_keep import RandomKeep
from .tofe import ToFeBlock, ToFeStage
from .tome import ToMeBlock, bipartite_soft_matching

REDUCTIONS = ("none", "random", "importance", "evit", "tome", "hourglass", "hired", "tofe", "dtc")
ATTACH = {"random": random_keep.attach, "importance": importance.attach, "evit": evit.attach, "tome": tome.attach,
          "hourglass": hourglass.attach, "hired": hired.attach, "tofe": tofe.attach}

__all__ = [
    "ATTACH", "REDUCTIONS", "EViTBlock", "HiREDBlock", "HourglassStage", "ImportanceStage", "KeepScorePredictor", "PolicyBlock", "RandomKeep",
    "ReducingBlock", "SaliencyBlock", "ToFeBlock", "ToFeStage", "ToMeBlock", "bipartite_soft_matching", "convert_block", "fuse_inattentive",
    "gather_tokens", "keep_assignment", "keep_tokens", "policy_attention",
]
