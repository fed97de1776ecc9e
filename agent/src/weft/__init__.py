"""Weft: an encrypted overlay mesh for hybrid clouds."""

__version__ = "0.5.0"
