"""Examples of the curveball library; run them from the repository root with ``-m``."""
