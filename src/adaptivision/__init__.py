"""AdaptiVision: vision transformers that condense patch tokens into content-adaptive super-tokens.

``import adaptivision`` registers the ``adaptivision_*`` models with timm::

    import adaptivision, timm
    model = timm.create_model("adaptivision_small_patch16_224")
"""
from .config import PAPER_DTC, ModelOptions
from .models import AdaptiVision, from_timm
from .objective import AdaptiVisionLoss, align_loss, cluster_loss
from .profile import profile
from .version import __version__

__all__ = ["PAPER_DTC", "AdaptiVision", "AdaptiVisionLoss", "ModelOptions", "__version__", "align_loss", "cluster_loss", "from_timm",
           "profile"]
