"""Glue for the training loops people already use.

* :mod:`curveball.integrations.lightning`: PyTorch Lightning (manual optimization);
* :mod:`curveball.integrations.transformers`: ``CurveBallTrainer``, a drop-in for the
  Hugging Face ``transformers.Trainer``.

Each module imports its framework only when it is imported itself; the core
library depends on torch alone.
"""
