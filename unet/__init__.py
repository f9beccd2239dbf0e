"""The Stable Diffusion 2.1 UNet (see model.py), its one attention function and its control seam."""

from .attention import attention
from .control import UNetControl
from .model import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "UNetControl", "attention"]
