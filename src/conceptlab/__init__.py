"""conceptlab: teach a frozen Stable Diffusion model new concepts, and compare the ways of doing it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("conceptlab")  # pyproject.toml is the one place the version is written
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
