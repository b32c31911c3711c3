"""AdaptiVision: vision transformers that condense patch tokens into content-adaptive super-tokens.

``import adaptivision`` registers the ``adaptivision_*`` models with timm::

    import adaptivision, timm
    model = timm.create_model("adaptivision_small_patch16_224")
"""
from .config import ModelOptions
from .models import AdaptiVision, from_timm
from .objective import AdaptiVisionLoss, align_loss, cluster_loss
from .profile import profile

__version__ = "0.1.0"
__all__ = ["AdaptiVision", "AdaptiVisionLoss", "ModelOptions", "align_loss", "cluster_loss", "from_timm", "profile"]
