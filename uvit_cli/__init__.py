"""uvit: the U-ViT diffusion backbone as a command-line toolkit."""

__version__ = "0.1.0"
