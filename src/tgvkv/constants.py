"""Constants shared by the ops, the policies, the model layer and the reference (defined once).

``modality`` maps hold one of these per cache slot (``[B, N]`` int8).
"""

PAD, TEXT, VISION = 0, 1, 2
BUDGET_MODES = ("mass", "mi")
TEXT_SCORE_MODES = ("guidance", "all_queries")
MAX_N_SINK = 2**31 - 1  # slot counts are 32-bit in the kernels (csrc/checks.h kMaxNSink)

__all__ = ["PAD", "TEXT", "VISION", "BUDGET_MODES", "TEXT_SCORE_MODES", "MAX_N_SINK"]
