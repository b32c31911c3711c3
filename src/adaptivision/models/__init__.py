"""Model assembly and timm registration (importing this registers ``adaptivision_*`` with timm)."""
from . import lemevit, registry  # noqa: F401  (registers the models with timm)
from .adaptivision import AdaptiVision, TokenOutput
from .from_timm import from_timm

__all__ = ["AdaptiVision", "TokenOutput", "from_timm"]
