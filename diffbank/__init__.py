"""diffbank: feature banks from text-free diffusion U-Nets, and the probes that read them."""

__version__ = "0.1.0"
