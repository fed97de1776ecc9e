"""Weft: an encrypted overlay mesh for hybrid clouds."""

__version__ = "0.4.1"
