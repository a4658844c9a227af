"""Generative adversarial networks: a generator and a discriminator trained against each other."""
