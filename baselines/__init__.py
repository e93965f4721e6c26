"""Baseline erasure methods (ESD, UCE, MACE, RECE): one file each, registered as cpebench.methods plugins."""
