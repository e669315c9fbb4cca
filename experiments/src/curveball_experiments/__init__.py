"""Experiments of the CurveBall paper, reproduced with the ``curveball`` library.

Run them with ``python -m curveball_experiments NAME``; see
:mod:`curveball_experiments.cli` for the options. The modules:

* :mod:`~curveball_experiments.problems`: stochastic Rosenbrock and the degenerate
  two-layer linear network;
* :mod:`~curveball_experiments.runners`: MNIST, CIFAR-10, ImageNet and random
  architectures, on :mod:`~curveball_experiments.training` (the training loop)
  and :mod:`~curveball_experiments.datasets` (the splits and folder rules);
* :mod:`~curveball_experiments.optimizers`: CurveBall, SGD, Adam, L-BFGS and
  Levenberg-Marquardt behind one stepping interface;
* :mod:`~curveball_experiments.report`: ``results.json``, ``table.md`` and plots;
* :mod:`~curveball_experiments.models` and :mod:`~curveball_experiments.readers`:
  the model zoo and the readers of the official file formats;
* :mod:`~curveball_experiments.step_size_interval`: how often to solve for ρ and β.
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
