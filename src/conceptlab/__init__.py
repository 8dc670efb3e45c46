"""conceptlab: teach a frozen Stable Diffusion model new concepts, and compare the ways of doing it."""

__version__ = "0.1.0"
