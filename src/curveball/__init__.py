"""curveball: the CurveBall second-order optimizer for PyTorch.

CurveBall (Henriques et al., "Small steps and giant leaps: Minimal Newton
solvers for Deep Learning", ICCV 2019) keeps a running estimate of the Newton
step, improves it by one step of gradient descent on the quadratic model per
iteration, and moves the parameters along it; curvature products come from
true forward-mode automatic differentiation.
"""

from curveball.curvature.ggn import ggn_vector_product
from curveball.optimizer import CurveBall, StepInfo

__version__ = "0.1.0"

__all__ = ["CurveBall", "StepInfo", "__version__", "ggn_vector_product"]
