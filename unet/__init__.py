"""The Stable Diffusion UNet of SD-1.5 and SD-2.x (see model.py), its one attention function and its control seam."""

from .attention import attention
from .control import UNetControl
from .model import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "UNetControl", "attention"]
