"""icl_course: the companion package of the course *In-context learning as optimization*.

Data flows one way, and so do the modules:
``tasks`` (sampling sequences) -> ``tokens`` (building Z) -> ``linear_transformer`` (models) ->
``training`` -> ``solvers`` and ``metrics`` (classical learners and comparisons) -> ``plots``.
Each chapter's experiment lives in ``icl_course.experiments``; exercise checks in
``icl_course.checks``. Importing the package only defines things.
"""

from .linear_transformer import (
    DiagAttention,
    FullAttention,
    GDPPAttention,
    LinearTransformer,
    gd_transformer,
    gdpp_transformer,
    linear_transformer,
)
from .metrics import (
    evaluate,
    implicit_weights,
    implicit_weights_per_layer,
    model_cosine,
    model_distance,
    mse_loss,
    prediction_distance,
)
from .runtime import get_device, get_profile
from .solvers import GDPlusPlus, GradientDescent, LeastSquares, Ridge, tune_gdpp, tune_step_size
from .tasks import Choice, Gaussian, RegressionBatch, RegressionTask, Uniform, generator
from .tokens import make_tokens, read_prediction
from .training import History, TrainConfig, TrainingDiverged, checkpointing, train

__version__ = "0.1.0"

__all__ = [
    "Choice",
    "DiagAttention",
    "FullAttention",
    "GDPlusPlus",
    "GDPPAttention",
    "Gaussian",
    "GradientDescent",
    "History",
    "LeastSquares",
    "LinearTransformer",
    "RegressionBatch",
    "RegressionTask",
    "Ridge",
    "TrainConfig",
    "TrainingDiverged",
    "Uniform",
    "checkpointing",
    "evaluate",
    "gd_transformer",
    "gdpp_transformer",
    "generator",
    "get_device",
    "get_profile",
    "implicit_weights",
    "implicit_weights_per_layer",
    "linear_transformer",
    "make_tokens",
    "model_cosine",
    "model_distance",
    "mse_loss",
    "prediction_distance",
    "read_prediction",
    "train",
    "tune_gdpp",
    "tune_step_size",
]
