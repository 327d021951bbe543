"""Chapter 7's experiment: how the outer optimizer (sign descent, Adam, GD) shapes a transformer.

Li et al. 2024 (arXiv 2410.04870) train a two-layer transformer (softmax attention, then a fixed
linear layer) on signal-plus-sparse-noise data and prove that sign descent, Adam's simple
surrogate, fits the training set by *memorising the noise*, in four stages, and then generalizes
poorly, while gradient descent generalizes. This chapter measures the four stages; for stage III (the
"majority voting" of the query/key signal signs) we could not retrieve the paper's exact statement of
the vote, so both readings of it (by sum and by count of the noise terms) are measured. The paper's sizes
are not public; ours (``SignDescentConfig``) follow ``SCIENCE.md``: n = 50, d = 2000, noise on 40 coordinates.

``run(profile)`` trains the same initial model on the same data with the three optimizers at one
signal-to-noise ratio, tracking the paper's stage quantities at every step, and does so again for
``config.seeds`` seeds (run indices: initial weights, training and test data all change); run 0
makes the figures, every headline number is also given per seed and as mean ± std over the seeds
(``metrics["by_seed"]``, ``metrics["over_seeds"]``, ``metrics["holds"]``). It then repeats the
training (without tracking) over a sweep of signal-to-noise ratios and seeds, trains Adam over a grid
of betas at the main SNR (:func:`adam_beta_sweep`), and trains chapter 1's linear self-attention layer on
in-context regression with the three outer optimizers (:mod:`.in_context`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch

from icl_course import plots
from icl_course.progress import ProgressBar
from icl_course.results import Lookup, binomial_se, over_seeds
from icl_course.runtime import generator, get_device, get_profile
from icl_course.training import FullBatch, TrainConfig, train

from .in_context import InContextConfig, in_context_figure, in_context_run
from .optimizers import RuleOptimizer, UpdateRule, adam, gd, sign_descent
from .signal_noise import (
    SignalNoiseTask,
    SoftmaxAttentionClassifier,
    accuracy,
    logistic_loss,
    stage_quantities,
    value_noise,
    value_signal,
)

__all__ = [
    "SignDescentConfig",
    "SignDescentResult",
    "CONFIGS",
    "OPTIMIZERS",
    "COLOURS",
    "run",
    "make_rules",
    "datasets",
    "training_set",
    "train_once",
    "first_step_accuracy",
    "SEED_CLAIMS",
    "sweep_holds",
    "adam_beta_sweep",
    "beta_cell",
    "first_step_from_which",
]

OPTIMIZERS = ("sign descent", "Adam", "GD")  # the order of every table and figure
COLOURS = {"sign descent": "C0", "Adam": "C1", "GD": "C2"}  # one colour per optimizer, every figure
SNR_LABEL = r"SNR $= \|\mu\| / (\sigma_p \sqrt{s})$"


@dataclass(frozen=True)
class SignDescentConfig:
    d: int = 2000  # patch dimension (d >> n: each sample's noise has coordinates of its own)
    n_train: int = 50  # training samples (full batch)
    n_test: int = 1000  # fresh samples behind every test metric
    sparsity: int = 40  # non-zero coordinates of a noise patch
    noise_norm: float = 1.0  # sigma_p sqrt(sparsity)
    snr: float = 0.5  # ||mu|| / noise_norm of the main run, where the stages are tracked
    width: int = 10  # query/key width m_k and value width m_v
    init_std: float = 0.1  # std of every initial weight; keep lr * ||xi||_1 small against it
    steps: int = 400  # full-batch optimizer steps
    lr_sign: float = 3e-3  # sign descent moves every weight by exactly this per step
    lr_adam: float = 3e-3  # Adam, betas below
    lr_gd: float = 30.0  # GD needs a large rate: the gradients here are small
    adam_betas: tuple[float, float] = (0.9, 0.999)
    stage1_steps: int = 3  # the window where stage I (value noise linear, keys at init) is measured
    sweep_snrs: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0)
    seeds: int = 3  # runs of the main comparison at snr (run indices 0 .. seeds - 1); run 0 makes the figures
    sweep_seeds: int = 3  # seeds per (optimizer, snr) in the sweep (at snr, the main runs are reused)
    log_every: int = 10  # how often the test loss is measured along a run
    # Adam's betas swept at snr (lr_adam), beta1 x beta2, on the first beta_seeds runs; (0, 0) is sign
    # descent up to eps, and adam_betas' cell reuses the main runs
    beta1_grid: tuple[float, ...] = (0.0, 0.5, 0.9)
    beta2_grid: tuple[float, ...] = (0.0, 0.9, 0.999)
    beta_seeds: int = 3  # (capped at seeds) each cell is compared with sign descent's run on the same seed
    # chapter 1's linear self-attention trained with the three outer optimizers (None leaves it out)
    in_context: InContextConfig | None = field(default_factory=InContextConfig)
    seed: int = 0  # run k uses model seed seed + 100 k, training data + 1, test data + 2

    def __post_init__(self):
        for name in ("steps", "seeds", "sweep_seeds", "log_every", "n_train", "n_test", "width", "beta_seeds"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SignDescentConfig.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.stage1_steps, int) or not 1 <= self.stage1_steps < self.steps:
            raise ValueError(f"SignDescentConfig.stage1_steps must be an integer in [1, steps), got {self.stage1_steps!r}")
        if len(self.sweep_snrs) == 0 or min(self.sweep_snrs) < 0:
            raise ValueError(f"SignDescentConfig.sweep_snrs must be a non-empty tuple of numbers >= 0, got {self.sweep_snrs!r}")
        if not self.init_std > 0:
            raise ValueError(f"SignDescentConfig.init_std must be > 0, got {self.init_std!r}")
        for name in ("beta1_grid", "beta2_grid"):
            grid = getattr(self, name)
            if len(grid) == 0 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in grid):
                raise ValueError(f"SignDescentConfig.{name} must be a non-empty tuple of numbers in [0, 1), got {grid!r}")
        self.task(self.snr)  # validates d, sparsity, snr and noise_norm
        make_rules(self)  # validates the learning rates and betas

    def task(self, snr: float) -> SignalNoiseTask:
        return SignalNoiseTask(d=self.d, snr=snr, sparsity=self.sparsity, noise_norm=self.noise_norm)


def make_rules(config: SignDescentConfig) -> dict[str, UpdateRule]:
    """The three outer optimizers, by name, with the config's learning rates."""
    b1, b2 = config.adam_betas
    return {
        "sign descent": sign_descent(config.lr_sign),
        "Adam": adam(config.lr_adam, b1=b1, b2=b2),
        "GD": gd(config.lr_gd),
    }


CONFIGS = {
    # seconds: half the data and dimension (same n s / d), a short run, two seeds of the main
    # comparison and a two-point sweep on one seed; the stages and the generalization gap already
    # show (the tests assert them at this scale, on run 0)
    "smoke": SignDescentConfig(
        d=1000, n_train=25, n_test=300, steps=120, seeds=2, sweep_snrs=(0.2, 4.0), sweep_seeds=1, log_every=20,
        beta1_grid=(0.0, 0.9), beta2_grid=(0.0, 0.999), beta_seeds=2,
        in_context=InContextConfig(steps=40, batch_size=128, seeds=2, n_eval=500,
                                   lr_grid={"sign descent": (1e-2,), "Adam": (1e-2,), "GD": (3.0,)}),
    ),
    # the chapter's numbers, 3 seeds everywhere; 9 tracked runs and 63 more for the sweep (its 9 runs at
    # snr are the main ones), 24 more for the betas grid, 15 short in-context runs (timings.json has the time)
    "quick": SignDescentConfig(),
    # a GPU (not yet timed on one): four times the data and dimension (same n s / d), longer
    # training, more seeds and a wider sweep; 15 tracked runs and 81 more of 1000 steps
    "full": SignDescentConfig(
        d=8000, n_train=200, n_test=2000, steps=1000, seeds=5, sweep_seeds=3,
        sweep_snrs=(0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
    ),
}


@dataclass
class Run:
    """One training run: final numbers, the loss at every step, test curves and (optionally) stages."""

    model: SoftmaxAttentionClassifier  # the trained model (on the CPU)
    final: dict[str, float]  # FINAL_KEYS: train and test loss and accuracy, the test ones' standard errors
    train_loss: list[float]  # before every step, then after the last
    test_curve: dict[str, list[float]]  # step, test_loss
    stages: dict[str, list[float]] | None  # step and STAGE_QUANTITIES, before every step and after the last
    seconds: float


FINAL_KEYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "test_loss_se", "test_accuracy_se")


@torch.no_grad()
def _evaluate(model, batch) -> dict[str, float]:
    """Mean logistic loss and accuracy on ``batch``, each with its standard error over the samples."""
    logits = model(batch.X)
    n = len(batch.y)
    per_sample = torch.nn.functional.softplus(-batch.y * logits)  # (n,): what logistic_loss averages
    acc = accuracy(logits, batch.y)
    return {
        "loss": logistic_loss(logits, batch.y).item(),
        "accuracy": acc,
        "loss_se": per_sample.std().item() / math.sqrt(n) if n > 1 else float("nan"),
        "accuracy_se": binomial_se(acc, n),
    }


def training_set(config: SignDescentConfig, snr: float, run_index: int = 0) -> FullBatch:
    """The fixed training set of run ``run_index`` at ``snr``, as ``train`` takes it (full batch)."""
    return FullBatch(config.task(snr), config.n_train, seed=config.seed + 100 * run_index + 1)


def datasets(config: SignDescentConfig, snr: float, run_index: int = 0, device=None):
    """The training and test sets of run ``run_index`` at ``snr``: ``(train_set, test_set)``."""
    train_set = training_set(config, snr, run_index).sample(config.n_train, device=device)
    test_set = config.task(snr).sample(config.n_test, generator(config.seed + 100 * run_index + 2), device=device)
    return train_set, test_set


def train_once(
    config: SignDescentConfig, optimizer: str, snr: float, run_index: int = 0, track_stages: bool = False,
    device=None, callback=None,
) -> Run:
    """Train a fresh model with ``optimizer`` (a key of :func:`make_rules`) on data at ``snr``.

    Every optimizer with the same ``run_index`` starts from the same weights and sees the same data.
    The test loss is tracked every ``config.log_every`` steps, the stage quantities (if asked for)
    at every step; under :func:`icl_course.training.checkpointing` the run resumes with them.
    """
    rules = make_rules(config)
    if optimizer not in rules:
        raise ValueError(f"optimizer must be one of {sorted(rules)}, got {optimizer!r}")
    device = device or get_device()
    train_set, test_set = datasets(config, snr, run_index, device)
    model = SoftmaxAttentionClassifier(
        config.d, width=config.width, init_std=config.init_std, seed=config.seed + 100 * run_index
    ).to(device)

    def measure_test_loss(model) -> dict[str, float]:
        return {"test_loss": _evaluate(model, test_set)["loss"]}

    def measure_stages(model) -> dict[str, float]:
        return stage_quantities(model, train_set)

    history = train(
        model, training_set(config, snr, run_index),
        TrainConfig(steps=config.steps, batch_size=config.n_train, grad_clip=None, log_every=1), callback, device,
        optimizer=RuleOptimizer(model.parameters(), rules[optimizer]),
        track=[(measure_test_loss, config.log_every)] + ([(measure_stages, 1)] if track_stages else []),
    )
    test_curve, stages = history.tracked[0], (history.tracked[1] if track_stages else None)
    on_train, on_test = _evaluate(model, train_set), _evaluate(model, test_set)
    final = {
        "train_loss": on_train["loss"], "train_accuracy": on_train["accuracy"],
        "test_loss": on_test["loss"], "test_accuracy": on_test["accuracy"],
        "test_loss_se": on_test["loss_se"], "test_accuracy_se": on_test["accuracy_se"],  # over the n_test samples
    }
    return Run(model.cpu(), final, history.losses + [on_train["loss"]], test_curve, stages, history.seconds)


def first_step_below(values: list[float], threshold: float) -> int | None:
    """The first index whose value is below ``threshold`` (None if none is)."""
    return next((k for k, v in enumerate(values) if v < threshold), None)


def first_step_above(values: list[float], threshold: float) -> int | None:
    """The first index whose value is above ``threshold`` (None if none is)."""
    return next((k for k, v in enumerate(values) if v > threshold), None)


def first_step_from_which(values: list, test) -> int | None:
    """The first index from which ``test(value)`` holds to the end (None if it fails at the end)."""
    k = len(values)
    while k > 0 and test(values[k - 1]):
        k -= 1
    return None if k == len(values) else k


def sign_step_bound(config: SignDescentConfig) -> float:
    """The most one sign-descent step can move ``<w_V, y xi>``: ``lr E||xi||_1 = lr s sigma_p sqrt(2/pi)``.

    Sign descent moves every coordinate of ``w_V`` by exactly ``lr``; the inner product with a noise
    patch moves by ``lr ||xi||_1`` when every coordinate moves the helpful way, less when samples
    whose noise shares a coordinate pull it in opposite directions.
    """
    return config.lr_sign * config.sparsity * config.task(config.snr).sigma_p * (2 / torch.pi) ** 0.5


def first_step_accuracy(config: SignDescentConfig, snr: float) -> dict[str, float]:
    """Test accuracy after one small step of sign descent or GD from zero values, by a rough estimate.

    Freeze the attention at 1/2, so ``f(X) ~ sum_j j <w_V,j, y mu + xi>``, and take one step on the
    values. GD moves them along ``n mu + sum_i y_i xi_i``; on a fresh sample the signal gives
    ``n ||mu||^2`` and the overlap of the new noise with the training noise a zero-mean term of std
    ``sqrt(n s^2 / (d - 1)) sigma_p^2``. Sign descent moves *every* touched coordinate by the same
    amount: the signal gives ``||mu||``, the new noise a term of std ``sigma_p sqrt(p s)``, where
    ``p = 1 - (1 - s / (d - 1))^n`` is the fraction of coordinates some training noise touches.
    With Gaussian cross terms the accuracy is ``Phi(signal / std)``: ``Phi(snr^2 sqrt(n (d - 1)))``
    for GD and ``Phi(snr / sqrt(p))`` for sign descent. A heuristic for the first step, not a
    theorem about training; the chapter compares it with the trained models.
    """
    n, d, s = config.n_train, config.d, config.sparsity
    p = 1 - (1 - s / (d - 1)) ** n
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731 (standard normal CDF)
    return {"sign descent": phi(snr / math.sqrt(p)), "GD": phi(snr**2 * math.sqrt(n * (d - 1)))}


def stage_summary(config: SignDescentConfig, stages: dict[str, list[float]]) -> dict[str, float | int | None]:
    """The numbers behind the four stages, from one run's tracked quantities."""
    k = config.stage1_steps
    noise = stages["value_noise"]
    increments = [b - a for a, b in zip(noise[:k], noise[1 : k + 1])]
    per_step = sum(increments) / k
    key0 = stages["key_noise"][0]
    signal = stages["value_signal"][-1]
    final_q, final_k = stages["query_signal_signs"][-1], stages["key_signal_signs"][-1]
    settle_q = first_step_from_which(stages["query_signal_signs"], lambda v: v == final_q)
    settle_k = first_step_from_which(stages["key_signal_signs"], lambda v: v == final_k)
    return {
        "stage1_value_noise_per_step": per_step,
        "stage1_value_noise_increment_spread": (max(increments) - min(increments)) / abs(per_step),
        "stage1_value_noise_change": noise[k] - noise[0],
        "stage1_key_noise_change": stages["key_noise"][k] - key0,
        "stage1_key_noise_relative_change": abs(stages["key_noise"][k] - key0) / key0,
        "key_noise_init": key0,
        "steps_to_noise_attention_0.1": first_step_below(stages["attention_noise_to_signal"], 0.1),
        "steps_to_qk_sign_agreement_0.9": first_step_above(stages["qk_noise_sign_agreement"], 0.9),
        # stage III: from which step every sign of <w_Q,s, mu> (<w_K,s, mu>) stays as it ends
        "stage3_query_signal_settle": settle_q,
        "stage3_key_signal_settle": settle_k,
        "stage3_signal_settle": max(settle_q, settle_k),
        "stage3_final_query_vote_agreement": stages["query_signal_vote_agreement"][-1],
        "stage3_final_key_vote_agreement": stages["key_signal_vote_agreement"][-1],
        "stage3_final_query_count_vote_agreement": stages["query_signal_count_vote_agreement"][-1],
        "stage3_final_key_count_vote_agreement": stages["key_signal_count_vote_agreement"][-1],
        # from which step every query signal sign equals its vote (by sum), every key signal sign its opposite
        "stage3_steps_to_query_with_vote": first_step_from_which(stages["query_signal_vote_agreement"], lambda v: v == 1),
        "stage3_steps_to_key_against_vote": first_step_from_which(stages["key_signal_vote_agreement"], lambda v: v == 0),
        "final_attention_noise_to_signal": stages["attention_noise_to_signal"][-1],
        "final_attention_signal_to_signal": stages["attention_signal_to_signal"][-1],
        "final_value_noise": noise[-1],
        "final_value_signal": stages["value_signal"][-1],
        "memorisation_ratio": noise[-1] / signal if signal > 0 else None,  # None: no signal learned
    }


def _never(steps: int | None) -> float:
    return math.inf if steps is None else steps


# What the chapter claims of one seed's main comparison, each a test of ``one`` (``by_seed`` at one
# seed: metric -> optimizer -> value, and stage_summary -> optimizer -> name -> value). The
# thresholds are the claim tests' (tests/test_sign_descent.py), where they have one.
SEED_CLAIMS = {
    "fit": (
        "sign descent and Adam fit every training sample",
        lambda one: one["train_accuracy"]["sign descent"] == 1 and one["train_accuracy"]["Adam"] == 1,
    ),
    "gap": (
        "GD generalizes (test accuracy >= 0.95), sign descent and Adam do not (< 0.8)",
        lambda one: one["test_accuracy"]["GD"] >= 0.95 and max(one["test_accuracy"][n] for n in ("sign descent", "Adam")) < 0.8,
    ),
    "test_loss": (
        "sign descent's test loss is over 10 times GD's",
        lambda one: one["test_loss"]["sign descent"] > 10 * one["test_loss"]["GD"],
    ),
    "gd_fits_first": (
        "GD reaches training loss 0.1 in fewer steps than sign descent",
        lambda one: _never(one["steps_to_train_loss_0.1"]["GD"]) < _never(one["steps_to_train_loss_0.1"]["sign descent"]),
    ),
    "stage1": (
        "stage I (sign descent): equal value-noise increments (within 1%), key noise moves < 20% of its size",
        lambda one: one["stage_summary"]["sign descent"]["stage1_value_noise_increment_spread"] < 0.01
        and one["stage_summary"]["sign descent"]["stage1_key_noise_relative_change"] < 0.2,
    ),
    "qk_first": (
        "query/key noise signs agree (90%) before the noise patch's attention to the signal falls below 0.1 (sign descent)",
        lambda one: _never(one["stage_summary"]["sign descent"]["steps_to_qk_sign_agreement_0.9"])
        < _never(one["stage_summary"]["sign descent"]["steps_to_noise_attention_0.1"]),
    ),
    "stage3": (
        "stage III (sign descent): every query signal sign ends equal to its vote, sign sum_i <w_Q,s, y_i xi_i>, "
        "and every key signal sign opposite to its vote, sign sum_i <w_K,s, y_i xi_i>",
        lambda one: one["stage_summary"]["sign descent"]["stage3_final_query_vote_agreement"] == 1
        and one["stage_summary"]["sign descent"]["stage3_final_key_vote_agreement"] == 0,
    ),
    "memorisation": (
        "value noise ends above value signal with sign descent and Adam, below it with GD",
        lambda one: all(
            (one["stage_summary"][n]["final_value_noise"] > one["stage_summary"][n]["final_value_signal"]) == (n != "GD")
            for n in OPTIMIZERS
        ),
    ),
}


def _at_seed(tree, k: int):
    """The ``k``-th entry of every per-seed list in ``tree``."""
    return {key: _at_seed(v, k) for key, v in tree.items()} if isinstance(tree, dict) else tree[k]


def sweep_holds(snr_sweep: dict, test) -> list[list[bool]]:
    """Per sweep SNR, per seed: does ``test({optimizer: test accuracy})`` hold? (``snr_sweep`` is
    ``metrics["snr_sweep"]``.) ``sweep_holds(sweep, lambda a: a["GD"] >= 0.95)[i]`` is one verdict per seed."""
    per_seed = {n: snr_sweep[n]["by_seed"]["test_accuracy"] for n in OPTIMIZERS}  # n -> snr -> seed
    return [
        [test({n: per_seed[n][i][k] for n in OPTIMIZERS}) for k in range(len(per_seed[OPTIMIZERS[0]][i]))]
        for i in range(len(snr_sweep["snr"]))
    ]


def _band(fig, panel: int, xs, spread: dict[str, dict[str, list]]):
    """Shade mean ± std around the curve of each name in ``spread`` ({name: {"mean", "std"}}) on
    ``fig``'s panel ``panel``, in the curve's colour; a point without a std gets no band."""
    ax = fig.axes[panel]
    for line in list(ax.lines):
        s = spread.get(line.get_label())
        if s is None or all(v is None for v in s["std"]):
            continue
        lo = [m - (v or 0.0) for m, v in zip(s["mean"], s["std"])]
        hi = [m + (v or 0.0) for m, v in zip(s["mean"], s["std"])]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, lw=0)


def _gap_figure(acc: dict, title: str):
    """Train and test accuracy per optimizer (``acc``: ``metrics["over_seeds"]``), bars in the
    optimizer's colour (train light and hatched, test solid), mean ± std over the seeds."""
    from matplotlib.patches import Patch

    fig, (ax,) = plots.figure()
    for i, n in enumerate(OPTIMIZERS):
        for shift, key, style in ((-0.2, "train_accuracy", {"alpha": 0.4, "hatch": "//"}),
                                  (0.2, "test_accuracy", {})):
            mean, std = acc[key][n]["mean"], acc[key][n]["std"]
            bar = ax.bar([i + shift], [mean], width=0.4, color=COLOURS[n], edgecolor=COLOURS[n], **style)
            ax.bar_label(bar, fmt="%.2f", fontsize=8, padding=6)
            if std is not None:
                ax.errorbar([i + shift], [mean], yerr=[std], fmt="none", ecolor="black", capsize=3, lw=1)
    ax.set_xticks(range(len(OPTIMIZERS)), OPTIMIZERS)
    ax.set(ylabel="accuracy", title=title, ylim=(0, 1.25))  # room for the legend above the bars
    ax.legend(handles=[Patch(facecolor="gray", alpha=0.4, hatch="//", label="train accuracy"),
                       Patch(facecolor="gray", label="test accuracy")], fontsize=8, ncols=2, loc="upper center")
    return fig


def _stages_figure(stages: dict[str, dict[str, list]], k: int):
    """The four stages in five panels on a 3x2 grid, the sixth holding the legend: stage I zoomed on
    its first ``k`` steps (sign descent only), then each quantity per optimizer (first seed)."""
    from matplotlib.lines import Line2D

    fig, axes = plots.figure(ncols=2, nrows=3, width=3.7, height=2.6)
    sign, steps = stages["sign descent"], stages["sign descent"]["step"]
    colour = COLOURS["sign descent"]
    ax = axes[0]
    ax.plot(steps[:k], [v - sign["value_noise"][0] for v in sign["value_noise"][:k]], color=colour)
    ax.plot(steps[:k], [v - sign["key_noise"][0] for v in sign["key_noise"][:k]], "--", color=colour)
    ax.set(title="I: value noise leads (sign descent)", ylabel="change since step 0")
    ax = axes[1]
    for n, st in stages.items():
        ax.plot(steps, st["qk_noise_sign_agreement"], color=COLOURS[n])
    ax.set(title="II: query and key noise signs agree", ylabel="fraction of pairs")
    ax = axes[2]
    for n, st in stages.items():
        if n != "GD":  # the vote is the sign optimizers' mechanism
            ax.plot(steps, st["query_signal_vote_agreement"], color=COLOURS[n])
            ax.plot(steps, st["key_signal_vote_agreement"], "--", color=COLOURS[n])
    ax.set(title="III: signal signs = their noise's vote", ylabel="fraction of neurons")
    ax = axes[3]
    for n, st in stages.items():
        ax.plot(steps, st["attention_noise_to_signal"], color=COLOURS[n])
    ax.set(title="IV: noise patch attends to signal", ylabel="$S_{21}$")
    ax = axes[4]
    for n, st in stages.items():
        ratio = [a / b if b > 0 else float("nan") for a, b in zip(st["value_noise"], st["value_signal"])]
        ax.plot(steps, ratio, color=COLOURS[n])
    ax.set(title="IV: value noise / value signal", yscale="log")
    for ax in axes[:5]:
        ax.set_xlabel("step")
    axes[5].axis("off")
    handles = [Line2D([], [], color=COLOURS[n], label=n) for n in stages]
    handles += [Line2D([], [], color="gray", label="solid: value noise (I), query (III)"),
                Line2D([], [], color="gray", ls="--", label="dashed: key noise (I), key (III)")]
    axes[5].legend(handles=handles, loc="center", fontsize=9, frameon=False)
    return fig


BETA_KEYS = ("test_accuracy", "test_loss", "train_accuracy", "value_noise", "value_signal", "test_accuracy_gap")


def adam_beta_sweep(config: SignDescentConfig, seed_runs: list[dict[str, Run]], device=None, bar=None) -> dict:
    """Adam at every ``(beta1, beta2)`` of the config's grids, at ``config.snr`` with ``lr_adam``, on
    run indices ``0 .. min(beta_seeds, seeds) - 1``; the main runs are reused where the betas are ``adam_betas``.

    Per cell and seed: the final test accuracy and loss, the training accuracy, the mean value noise
    and value signal on the training set (:func:`value_noise`, :func:`value_signal`), and
    ``test_accuracy_gap``, Adam's test accuracy minus sign descent's on the same seed (same initial
    weights and data). Returns ``{"beta1", "beta2", "seeds", "cells": [{"beta1", "beta2", "by_seed":
    {key: [per seed]}, "over_seeds": {key: mean/std}}]}``, cells in row-major order (beta1 outer).
    """
    cells, n_seeds = [], min(config.beta_seeds, config.seeds)
    for b1 in config.beta1_grid:
        for b2 in config.beta2_grid:
            by_seed = {key: [] for key in BETA_KEYS}
            for k in range(n_seeds):
                if (b1, b2) == tuple(config.adam_betas):
                    one = seed_runs[k]["Adam"]  # the same run
                else:
                    one = train_once(replace(config, adam_betas=(b1, b2)), "Adam", config.snr, k, False, device, bar)
                train_set, _ = datasets(config, config.snr, k)
                by_seed["test_accuracy"].append(one.final["test_accuracy"])
                by_seed["test_loss"].append(one.final["test_loss"])
                by_seed["train_accuracy"].append(one.final["train_accuracy"])
                by_seed["value_noise"].append(value_noise(one.model, train_set).mean().item())
                by_seed["value_signal"].append(value_signal(one.model, train_set))
                by_seed["test_accuracy_gap"].append(one.final["test_accuracy"] - seed_runs[k]["sign descent"].final["test_accuracy"])
            cells.append({"beta1": b1, "beta2": b2, "by_seed": by_seed, "over_seeds": over_seeds(by_seed)})
    return {"beta1": list(config.beta1_grid), "beta2": list(config.beta2_grid), "seeds": n_seeds, "cells": cells}


def beta_cell(betas: dict, b1: float, b2: float) -> dict:
    """The cell of :func:`adam_beta_sweep`'s result (``metrics["adam_betas"]``) at ``(b1, b2)``."""
    for cell in betas["cells"]:
        if cell["beta1"] == b1 and cell["beta2"] == b2:
            return cell
    raise ValueError(f"(beta1, beta2) = ({b1!r}, {b2!r}) is not in the sweep's grid {betas['beta1']} x {betas['beta2']}")


def _beta_heatmaps(betas: dict, snr: float):
    """Two heat maps over (beta1, beta2): the test-accuracy gap to sign descent and the test loss,
    each cell labelled mean ± std over the seeds."""
    import numpy as np

    b1s, b2s = betas["beta1"], betas["beta2"]
    fig, axes = plots.figure(ncols=2, width=4.2, height=3.4)
    for ax, key, title, cmap in ((axes[0], "test_accuracy_gap", "test accuracy minus sign descent's", "RdBu_r"),
                                 (axes[1], "test_loss", "test loss", "viridis")):
        mean = np.array([[beta_cell(betas, a, b)["over_seeds"][key]["mean"] for b in b2s] for a in b1s])
        std = [[beta_cell(betas, a, b)["over_seeds"][key]["std"] for b in b2s] for a in b1s]
        vmax = float(np.abs(mean).max()) or 1.0
        im = ax.imshow(mean, cmap=cmap, vmin=-vmax if key == "test_accuracy_gap" else None,
                       vmax=vmax if key == "test_accuracy_gap" else None, origin="lower")
        for i in range(len(b1s)):
            for j in range(len(b2s)):
                label = f"{mean[i, j]:.2f}" + (f"\n± {std[i][j]:.2f}" if std[i][j] is not None else "")
                ax.text(j, i, label, ha="center", va="center", fontsize=8, color="black",
                        bbox={"facecolor": "white", "alpha": 0.6, "lw": 0})
        ax.set_xticks(range(len(b2s)), [f"{b:g}" for b in b2s])
        ax.set_yticks(range(len(b1s)), [f"{b:g}" for b in b1s])
        ax.set(xlabel=r"$\beta_2$", ylabel=r"$\beta_1$", title=f"{title}, SNR {snr:g}")
        ax.grid(False)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


@dataclass
class SignDescentResult:
    config: SignDescentConfig
    runs: dict[str, Run]  # the main run at config.snr, by optimizer (run 0: the figures')
    sweep: dict[str, dict]  # optimizer -> metric -> one mean per sweep snr; also metric_std and by_seed
    sweep_curves: dict[tuple[str, float], Run]  # (optimizer, snr) -> the first seed's run
    metrics: dict = field(default_factory=dict)
    seed_runs: list[dict[str, Run]] = field(default_factory=list)  # the main runs by run index (0 is ``runs``)

    def snr_curves(self, snr: float):
        """Training and test loss of the three optimizers at one sweep ``snr`` (first seed)."""
        runs = {name: self.sweep_curves[(name, snr)] for name in OPTIMIZERS}
        steps = list(range(self.config.steps + 1))
        test_steps = runs[OPTIMIZERS[0]].test_curve["step"]
        return plots.panels(
            {
                f"training loss, SNR {snr:g}": {n: r.train_loss for n, r in runs.items()},
                f"test loss, SNR {snr:g}": {n: r.test_curve["test_loss"] for n, r in runs.items()},
            },
            x={f"training loss, SNR {snr:g}": steps, f"test loss, SNR {snr:g}": test_steps},
            xlabel="step",
            logy=(f"training loss, SNR {snr:g}",),
            styles={n: {"color": COLOURS[n]} for n in OPTIMIZERS},
        )

    def figures(self) -> dict:
        """Every figure of the chapter, by name (what ``icl-course reproduce`` saves)."""
        stages = {name: run.stages for name, run in self.runs.items()}
        sign = stages["sign descent"]
        k = min(len(sign["step"]), 4 * self.config.stage1_steps + 1)  # zoom on stage I
        steps = sign["step"]
        m = self.metrics
        gap = _gap_figure(
            m["over_seeds"],
            title=f"after {self.config.steps} steps, SNR {self.config.snr:g}"
            + (f"; mean ± std over {self.config.seeds} seeds" if self.config.seeds > 1 else ""),
        )
        sweep = plots.panels(
            {
                "test accuracy": {
                    **{n: self.sweep[n]["test_accuracy"] for n in OPTIMIZERS},
                    **{f"{n}, first-step estimate": self.metrics["first_step_accuracy"][n] for n in ("sign descent", "GD")},
                },
                "test loss": {n: self.sweep[n]["test_loss"] for n in OPTIMIZERS},
            },
            x=list(self.config.sweep_snrs),
            xlabel=SNR_LABEL,
            logx=True,
            marker="o",
            styles={n: {"color": COLOURS[n]} for n in OPTIMIZERS}
            | {
                f"{n}, first-step estimate": {"ls": "--", "marker": None, "color": COLOURS[n]}
                for n in ("sign descent", "GD")
            },
        )
        for panel, key in enumerate(("test_accuracy", "test_loss")):  # shaded: mean ± std over the seeds
            _band(sweep, panel, list(self.config.sweep_snrs),
                  {n: {"mean": self.sweep[n][key], "std": self.sweep[n][f"{key}_std"]} for n in OPTIMIZERS})
        for ax in sweep.axes:  # one legend, below the panels: off the data
            ax.get_legend().remove()
        sweep.legend(*sweep.axes[0].get_legend_handles_labels(), fontsize=8, ncols=3, loc="outside lower center")
        return {
            "stages": _stages_figure(stages, k),
            "training": plots.panels(
                {
                    "training loss": {n: r.train_loss for n, r in self.runs.items()},
                    "test loss": {n: r.test_curve["test_loss"] for n, r in self.runs.items()},
                },
                x={"training loss": steps, "test loss": self.runs[OPTIMIZERS[0]].test_curve["step"]},
                xlabel="step",
                logy=("training loss",),
                styles={n: {"color": COLOURS[n]} for n in OPTIMIZERS},
            ),
            "generalization_gap": gap,
            "snr_sweep": sweep,
            "adam_betas": _beta_heatmaps(self.metrics["adam_betas"], self.config.snr),
            **({"in_context": in_context_figure(self.metrics["in_context"])} if "in_context" in self.metrics else {}),
        }


def run(profile: str | None = None, progress: bool = False, config: SignDescentConfig | None = None) -> SignDescentResult:
    """Train with sign descent, Adam and GD at ``config.snr`` on ``config.seeds`` seeds (stages
    tracked), then sweep the SNR. Top-level metrics are run 0's (the figures' run), ``by_seed`` holds
    every seed's, ``over_seeds`` their mean and std, ``holds`` each of ``SEED_CLAIMS`` per seed."""
    profile = get_profile(profile)
    config = config or CONFIGS[profile]
    device = get_device()
    start = time.perf_counter()
    seeds = range(config.seeds)
    reused = len(OPTIMIZERS) * min(config.seeds, config.sweep_seeds) * (config.snr in config.sweep_snrs)
    n_runs = len(OPTIMIZERS) * (config.seeds + len(config.sweep_snrs) * config.sweep_seeds) - reused
    n_runs += min(config.beta_seeds, config.seeds) * (len(config.beta1_grid) * len(config.beta2_grid)
                                   - (config.adam_betas[0] in config.beta1_grid and config.adam_betas[1] in config.beta2_grid))
    # one bar over every run (a bar per run would be n_runs bars)
    bar = ProgressBar(n_runs * config.steps, desc="sign descent, Adam, GD") if progress else None
    seed_runs = [{name: train_once(config, name, config.snr, k, True, device, bar) for name in OPTIMIZERS} for k in seeds]
    runs = seed_runs[0]

    def sweep_run(name: str, snr: float, k: int) -> Run:
        if snr == config.snr and k < config.seeds:
            return seed_runs[k][name]  # the same run (tracking the stages does not change it)
        return train_once(config, name, snr, k, False, device, bar)

    keys = ("test_accuracy", "test_loss", "train_accuracy", "train_loss")
    sweep = {name: {key: [] for key in keys} | {f"{key}_std": [] for key in keys} | {"by_seed": {key: [] for key in keys}}
             for name in OPTIMIZERS}
    sweep_curves = {}
    for snr in config.sweep_snrs:
        for name in OPTIMIZERS:
            finals = [sweep_run(name, snr, k) for k in range(config.sweep_seeds)]
            sweep_curves[(name, snr)] = finals[0]
            for key in keys:
                values = [one.final[key] for one in finals]
                spread = over_seeds(values)
                sweep[name][key].append(spread["mean"])
                sweep[name][f"{key}_std"].append(spread["std"])  # None with one seed
                sweep[name]["by_seed"][key].append(values)  # snr -> seed

    betas = adam_beta_sweep(config, seed_runs, device, bar)

    by_seed = {
        "run_index": list(seeds),
        **{key: {n: [seed_runs[k][n].final[key] for k in seeds] for n in OPTIMIZERS} for key in FINAL_KEYS},
        "steps_to_train_loss_0.1": {n: [first_step_below(seed_runs[k][n].train_loss, 0.1) for k in seeds] for n in OPTIMIZERS},
        "stage_summary": {n: {} for n in OPTIMIZERS},
    }
    for n in OPTIMIZERS:
        summaries = [stage_summary(config, seed_runs[k][n].stages) for k in seeds]
        by_seed["stage_summary"][n] = {key: [one[key] for one in summaries] for key in summaries[0]}
    metrics = {
        "snr": config.snr,
        **{key: {n: runs[n].final[key] for n in OPTIMIZERS} for key in FINAL_KEYS},
        "steps_to_train_loss_0.1": {n: first_step_below(runs[n].train_loss, 0.1) for n in OPTIMIZERS},
        "stage_summary": {n: stage_summary(config, runs[n].stages) for n in OPTIMIZERS},
        "stages": {n: runs[n].stages for n in OPTIMIZERS},
        "by_seed": by_seed,
        "over_seeds": over_seeds({k: v for k, v in by_seed.items() if k != "run_index"}),
        "holds": {name: [bool(test(_at_seed(by_seed, k))) for k in seeds] for name, (_, test) in SEED_CLAIMS.items()},
        "snr_sweep": {"snr": list(config.sweep_snrs), "seeds": config.sweep_seeds, **sweep},
        "first_step_accuracy": {
            n: [first_step_accuracy(config, snr)[n] for snr in config.sweep_snrs] for n in ("sign descent", "GD")
        },
        "sign_step_bound": sign_step_bound(config),
        "adam_betas": betas,
        "steps": config.steps,
        "seeds": config.seeds,
        "n_train": config.n_train,
        "n_test": config.n_test,
        "d": config.d,
        **({"in_context": in_context_run(config.in_context, device)} if config.in_context is not None else {}),
        "seconds": time.perf_counter() - start,
        "profile": profile,
        "device": str(device),
    }
    return SignDescentResult(config, runs, sweep, sweep_curves, Lookup.deep(metrics), seed_runs)
