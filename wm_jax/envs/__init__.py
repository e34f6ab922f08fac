"""Pixel environments: gymnax physics and rewards, rendered to 64x64 frames inside XLA (cartpole.py)."""
