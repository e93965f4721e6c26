"""Attacks on erased models (``cpebench attack``): each file one attack, as ``baselines/`` holds methods."""
