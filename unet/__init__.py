"""The Stable Diffusion UNet of SD-1.5 and SD-2.x (see model.py), its one attention function, its
control seam, and the ControlNet that conditions it (controlnet.py)."""

from .attention import attention
from .control import ControlResiduals, UNetControl
from .controlnet import ControlNet
from .model import UNet, UNetConfig

__all__ = ["ControlNet", "ControlResiduals", "UNet", "UNetConfig", "UNetControl", "attention"]
