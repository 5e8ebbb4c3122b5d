from .attention import AttnProcessor, SDPAProcessor, TransformerBlock, make_attention
from .unet import XAttnUNet

__all__ = ["AttnProcessor", "SDPAProcessor", "TransformerBlock", "XAttnUNet", "make_attention"]
