"""icl_course: the companion package of the course *In-context learning as optimization*.

The top level is the core every chapter shares, and data flows one way through it:
``tasks`` (sampling sequences) -> ``tokens`` (building Z) -> ``linear_transformer`` (models) ->
``training`` -> ``solvers`` and ``metrics`` (classical learners and comparisons) -> ``plots``;
``runtime`` (device, profile, seeded generators, input checks), ``progress``, ``pretrained`` (shipped weights) and
``checking`` (the exercises' check machinery) serve them all.
Each chapter's own code lives in its folder under ``icl_course.topics`` (the registry of chapters);
the course's tooling (command line, notebooks, grading, landing page) in ``icl_course.course``.
Importing the package only defines things.
"""

from . import _moved
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
    evaluate_with_error,
    per_sequence_losses,
    standard_error,
    implicit_weights,
    implicit_weights_per_layer,
    model_cosine,
    model_distance,
    mse_loss,
    prediction_distance,
)
from .runtime import generator, get_device, get_profile
from .solvers import GDPlusPlus, GradientDescent, LeastSquares, Ridge, tune_gdpp, tune_step_size
from .tasks import Choice, Gaussian, RegressionBatch, RegressionTask, Task, Uniform
from .tokens import make_tokens, read_prediction
from .training import History, TrainConfig, TrainingDiverged, checkpointing, train

__version__ = "0.1.0"

_moved.install()  # module names of the layout before icl_course.topics keep importing


def __getattr__(name: str):
    return _moved.attribute(name)


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
    "Task",
    "TrainConfig",
    "TrainingDiverged",
    "Uniform",
    "checkpointing",
    "evaluate",
    "evaluate_with_error",
    "per_sequence_losses",
    "standard_error",
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
