"""The micro world: synthetic 32×32 scenes and captions (``world``), its prompt sets (``prompts``) and
the classifiers that judge its images (``judges``), for measuring erasure on a CPU."""
