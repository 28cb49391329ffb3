"""edgebuild: transfer, compress, export, validate and bundle models for edge devices."""

__version__ = "0.1.0"
