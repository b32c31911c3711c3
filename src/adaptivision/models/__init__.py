"""Model assembly and timm registration (importing this registers ``adaptivision_*`` with timm)."""
from .adaptivision import AdaptiVision
from .from_timm import from_timm

__all__ = ["AdaptiVision", "from_timm"]
