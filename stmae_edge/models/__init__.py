"""Torch models: frozen pretrained backbones and the networks built on their features.

    backbones.py (efficientnet-lite0/1/2, VGG19; torchvision weight names) --features--> stmae.py
    (ST-MAE; settings and presets as data in stmae_config.py), or filtering_ae.py (the filtering
    autoencoder); both score with maps.py and gaussian.py, and families.py says which a file holds.
"""
