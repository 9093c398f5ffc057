"""Models: the multi-modal masked autoencoder (and its encoder), a UNet, and a segmentation head for the encoder."""

from m3leo_stream.models.mae import (
                                     VIT_SIZES,
                                     MAESegmentation,
                                     MultiModalEncoder,
                                     MultiModalMAE,
                                     load_encoder,
                                     save_encoder,
)
from m3leo_stream.models.unet import UNet

__all__ = ["VIT_SIZES", "MAESegmentation", "MultiModalEncoder", "MultiModalMAE", "UNet", "load_encoder",
           "save_encoder"]
