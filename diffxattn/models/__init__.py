from .attention import AttnProcessor, TransformerBlock, make_attention
from .unet import XAttnUNet

__all__ = ["AttnProcessor", "TransformerBlock", "XAttnUNet", "make_attention"]
