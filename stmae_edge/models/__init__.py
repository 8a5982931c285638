"""Torch models: frozen pretrained backbones and the ST-MAE network built on their features."""
