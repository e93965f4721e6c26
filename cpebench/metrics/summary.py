"""Summary scores H_o and H_a (docs/protocol.md), and the object task's class keys: pure functions and
constants that metrics and tables share (no torch)."""

from __future__ import annotations


def h_o(acc_erased: float, acc_remained: float) -> float:
    """Celebrities (MACE convention): the harmonic mean of efficacy (100 − Acc_e) and specificity
    (Acc_r), in %; 0 when both are 0."""
    efficacy, specificity = 100.0 - acc_erased, acc_remained
    if efficacy + specificity == 0:
        return 0.0
    return 2.0 * efficacy * specificity / (efficacy + specificity)


def h_a(cs_erased: float, cs_remained: float) -> float:
    """Artists (MACE): CS_r − CS_e, a difference and not a harmonic mean (auxiliary in v1)."""
    return cs_remained - cs_erased


# ESD Table 2's Imagenette classes in its order (torchvision's ImageNet category names).
IMAGENETTE = ("cassette player", "chain saw", "church", "gas pump", "tench", "garbage truck", "English springer",
              "golf ball", "parachute", "French horn")


def class_key(name: str) -> str:
    """An object class's value key: 'garbage truck' -> 'acc.garbage_truck'."""
    return "acc." + name.lower().replace(" ", "_")
