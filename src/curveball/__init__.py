"""curveball: the CurveBall second-order optimizer for PyTorch.

CurveBall (Henriques et al., "Small steps and giant leaps: Minimal Newton
solvers for Deep Learning", ICCV 2019) keeps a running estimate of the Newton
step, improves it by one step of gradient descent on the quadratic model per
iteration, and moves the parameters along it; curvature products come from
true forward-mode automatic differentiation.

The public API is what this module exports; every module whose name starts
with an underscore is internal and may change between releases.
"""

from curveball import losses, pointwise
from curveball._curvature.engine import DoubleBackwardUnsupported
from curveball._curvature.ggn import ggn_vector_product
from curveball._hyperparameters import FULL_BATCH_DEFAULTS, PAPER_DEFAULTS
from curveball._optimizer import CurveBall
from curveball._step_info import StepInfo
from curveball.pointwise import PointwiseResidual, Term

__version__ = "0.2.0"

__all__ = [
    "CurveBall",
    "DoubleBackwardUnsupported",
    "FULL_BATCH_DEFAULTS",
    "PAPER_DEFAULTS",
    "PointwiseResidual",
    "StepInfo",
    "Term",
    "__version__",
    "ggn_vector_product",
    "losses",
    "pointwise",
]
