"""Experiments of the CurveBall paper, reproduced with this library.

Run them with ``python -m curveball.experiments NAME`` (or ``curveball-experiments
NAME``); see :mod:`curveball.experiments.cli` for the options. The modules:

* :mod:`~curveball.experiments.problems`: stochastic Rosenbrock and the degenerate
  two-layer linear network;
* :mod:`~curveball.experiments.classification`: MNIST, CIFAR-10, ImageNet and random
  architectures;
* :mod:`~curveball.experiments.baselines`: SGD, Adam, L-BFGS, Levenberg-Marquardt;
* :mod:`~curveball.experiments.report`: ``results.json``, ``table.md`` and plots;
* :mod:`~curveball.experiments.models` and :mod:`~curveball.experiments.data`: the
  model zoo and the dataset loaders.
"""

EXPERIMENTS: tuple[str, ...] = (
    "rosenbrock",
    "linear",
    "mnist",
    "cifar10",
    "imagenet",
    "random-archs",
)
"""Names accepted on the command line (plus ``all``)."""
