"""vpotool: align text-to-video diffusion models with preference and reward feedback."""

__version__ = "0.1.0"
