"""Model assembly and timm registration (importing this registers ``adaptivision_*`` with timm)."""
from .adaptivision import AdaptiVision

__all__ = ["AdaptiVision"]
