"""Attention -> sliding-window layers with measured global layers."""
