"""Chapter 5's experiment: test-time training makes the inner loop explicit.

Sun et al. 2023 (arXiv 2310.13807) and 2024 (arXiv 2407.04620). ``run(profile)`` does five things:

1. **identities** (float64): one full-batch GD step of a linear inner model from ``W0 = 0`` is linear
   attention; mini-batch ``b = T`` is causal linear attention; ``b = 1`` without LayerNorm is the delta
   rule; Nadaraya-Watson kernel regression is softmax attention;
2. **primal vs dual** (float32): the two forms of TTT-Linear and TTT-MLP agree, and their speed;
3. **the mini-batch dial with hand-made views** (no training): ``k = x_i``, ``v = y_i``, ``q = x_{i+1}``,
   so the inner loop *is* online regression, from ``b = 1`` (LMS / delta rule) to ``b = n``;
4. **the outer loop**: small sequence models with each mixer trained on in-context regression
   (:class:`icl_course.topics.ttt.task.SequenceRegressionTask`), error over the last quarter of
   the points; TTT-Linear also at other mini-batch sizes;
5. **cost against sequence length**: time per token and state size of each mixer.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch

from icl_course import plots, pretrained
from icl_course.metrics import standard_error
from icl_course.results import Lookup
from icl_course.runtime import get_device, get_profile
from icl_course.tasks import generator
from icl_course.training import History, TrainConfig, TrainingDiverged, train

from . import layers as ttt
from . import recall
from .models import MIXERS, SequenceModel
from .task import SequenceRegressionTask, ridge_by_position

__all__ = ["TTTConfig", "TTTResult", "CONFIGS", "run", "identity_errors", "primal_dual", "inner_loop_errors",
           "mini_batch_dial", "mixer_costs", "make_model"]


@dataclass(frozen=True)
class TTTConfig:
    d: int = 16  # input dimension of the regression task
    n_points: int = 64  # (x, y) pairs per sequence, so 2 * n_points tokens
    noise: float = 0.1  # label noise std; var(y) = 1 + noise^2
    width: int = 64  # model width D
    n_layers: int = 2  # [mixer, MLP] blocks
    n_heads: int = 4  # heads per mixer (f = width / n_heads features each)
    mini_batch: int = 16  # inner mini-batch b of the ttt-* mixers
    mixers: tuple[str, ...] = MIXERS  # the mixers trained in the outer loop
    sweep_mini_batches: tuple[int, ...] = (4, 64)  # ttt-linear is also trained with these b
    train: TrainConfig = field(default_factory=TrainConfig)  # the outer loop: the same budget and data for every mixer
    # Outer learning rates tried for every mixer; each mixer's is chosen by its error on validation
    # sequences (never the held-out ones). Empty: train.lr for all.
    lrs: tuple[float, ...] = ()
    # The mixers trained again at each of these seeds (init and training data), at their chosen rate,
    # for the spread of the errors; figures come from ``seed``.
    spread_seeds: tuple[int, ...] = ()
    mlp_inner_std: tuple[float, float] = (0.02, 0.02)  # TTT-MLP's initial inner weights, per layer
    mlp_eta_base: float = 1.0  # TTT-MLP's inner learning-rate scale
    n_eval: int = 1024  # held-out sequences behind every error
    dial_mini_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # b values of the hand-made inner loop
    dial_etas: tuple[float, ...] = tuple(torch.logspace(-3, -0.5, 11).tolist())  # its inner learning rates
    timing_length: int = 1024  # tokens of the primal/dual timing
    timing_features: int = 64  # features per head in the timing (the paper's head size)
    timing_heads: int = 4
    timing_repeats: int = 5  # best of this many runs
    cost_lengths: tuple[int, ...] = (256, 1024, 4096)  # sequence lengths of the cost measurement
    cost_repeats: int = 2  # best of this many runs per mixer and length
    seed: int = 0  # model init; the data streams use seed + 1 (train) and seed + 2 (held out)
    # evaluate the shipped TTT-Linear models (the mini-batch sweep and the inner loop's knobs, trained on
    # the quick task: ``python -m icl_course.topics.ttt.experiment --write-sweep --write-knobs``)
    shipped: bool = False
    # sequences per pair count on which the shipped associative-recall models (:mod:`.recall`) are measured
    # (0: not measured)
    recall_eval: int = 0


_TRAIN = dict(batch_size=32, lr=1e-2, warmup=0.05, schedule="cosine", weight_decay=0.0, log_every=10)
_QUICK_MIXERS = ("linear-attention", "delta-rule", "ttt-linear", "ttt-linear-ln", "ttt-mlp", "softmax")
# one colour per mixer (the quick profile's curves take the default cycle in _QUICK_MIXERS' order)
MIXER_COLORS = {name: f"C{i}" for i, name in enumerate((*_QUICK_MIXERS, "ttt-mlp-ln"))}

CONFIGS = {
    # seconds: the pipeline, the identities and the timing; far too small and short for any claim
    "smoke": TTTConfig(
        d=4, n_points=8, width=8, n_layers=1, n_heads=2, mini_batch=4, mixers=_QUICK_MIXERS, sweep_mini_batches=(),
        train=TrainConfig(steps=2, **{**_TRAIN, "log_every": 1}), n_eval=64, dial_mini_batches=(1, 4, 8),
        dial_etas=(0.01, 0.05), timing_length=128, timing_features=16, timing_heads=1, timing_repeats=1,
        cost_lengths=(64, 128), cost_repeats=1, recall_eval=32,
    ),
    # a few minutes on a 2-core CPU: half the task of the issue (d = 8, 32 points), one layer
    "quick": TTTConfig(
        d=8, n_points=32, width=32, n_layers=1, n_heads=2, mixers=_QUICK_MIXERS, sweep_mini_batches=(),
        train=TrainConfig(steps=300, **_TRAIN), lrs=(3e-3, 1e-2), spread_seeds=(1, 2), shipped=True,
        n_eval=512, dial_mini_batches=(1, 2, 4, 8, 16, 32),
        dial_etas=tuple(torch.logspace(-3, -0.5, 7).tolist()), timing_heads=1, timing_repeats=3,
        cost_lengths=(256, 1024, 2048), recall_eval=512,
    ),
    # a GPU: the task (d = 16, 64 points), width 64, two layers, every mixer (not run in this session)
    "full": TTTConfig(
        train=TrainConfig(steps=3000, **{**_TRAIN, "batch_size": 128, "lr": 3e-3}), sweep_mini_batches=(1, 4, 32, 128),
        lrs=(1e-3, 3e-3, 1e-2), spread_seeds=(1, 2, 3, 4),
        n_eval=4096, cost_lengths=(256, 1024, 4096, 16384), recall_eval=recall.N_EVAL,
    ),
}


# --- 1. the identities ---------------------------------------------------------------------------


def _random_qkv(gen, B=2, H=2, T=64, f=8, dtype=torch.float64):
    """Random queries, keys, values with O(1) norms: 3 x (B, H, T, f)."""
    return tuple(torch.randn(B, H, T, f, generator=gen, dtype=dtype) / f**0.5 for _ in range(3))


def identity_errors(seed: int = 0) -> dict[str, float]:
    """Max |difference| (float64) between each TTT inner loop and the layer it should equal."""
    gen = generator(seed)
    q, k, v = _random_qkv(gen)  # (B, H, T, f)
    B, H, T, f = q.shape
    zero = [(torch.zeros(H, f, f, dtype=torch.float64), None)]  # a linear inner model, W0 = 0, no bias
    half = torch.full((B, H, T), 0.5, dtype=torch.float64)
    eta = 0.5 * torch.rand(B, H, T, generator=gen, dtype=torch.float64)  # any per-token rates
    one_step = ttt.one_gd_step_full_batch(q, k, v, eta=0.5)  # full batch, non-causal
    b_is_T, _ = ttt.ttt_primal(q, k, v, half, zero, mini_batch=T)  # causal, gradients at W0
    b_is_1, _ = ttt.ttt_primal(q, k, v, eta, zero, mini_batch=1)  # online GD
    err = lambda a, b: (a - b).abs().max().item()  # noqa: E731
    return {
        "full_batch_step_equivalence_max_abs_err": err(one_step, ttt.linear_attention(q, k, v, causal=False)),
        "causal_linear_attention_equivalence_max_abs_err": err(b_is_T, ttt.linear_attention(q, k, v)),
        "delta_rule_equivalence_max_abs_err": err(b_is_1, ttt.delta_rule(q, k, v, beta=2 * eta)),
        "softmax_equivalence_max_abs_err": err(ttt.nadaraya_watson(q, k, v), ttt.softmax_attention(q, k, v)),
    }


# --- 2. primal and dual forms --------------------------------------------------------------------


def _best_time(fn, repeats: int, device) -> float:
    """Best wall-clock seconds of ``fn()`` over ``repeats`` runs (after one warm-up run)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _ttt_inputs(T: int, f: int, H: int, kind: str, device, seed: int = 0):
    """One sequence of normalised q, k, v, per-token rates, W0 and LayerNorm for a timing or a comparison."""
    gen = generator(seed)
    q, k, v = (torch.nn.functional.normalize(t, dim=-1).to(device) for t in _random_qkv(gen, 1, H, T, f, torch.float32))
    eta = (torch.rand(1, H, T, generator=gen) / f).to(device)  # (1, H, T): eta_base * sigmoid(.) / f
    params = [(W.to(device), b.to(device)) for W, b in ttt.init_inner_params(f, H, kind, std=0.3, gen=gen)]
    ln = (1 + 0.1 * torch.randn(H, f, generator=gen)).to(device), (0.1 * torch.randn(H, f, generator=gen)).to(device)
    return (q, k, v, eta, params), dict(ln=ln, residual=True)


@torch.no_grad()
def primal_dual(T: int = 1024, f: int = 64, H: int = 4, mini_batch: int = 16, kind: str = "linear", repeats: int = 5,
                device=None) -> dict[str, float]:
    """Max |primal - dual| (float32, outputs and final states) and the best time of each form."""
    device = device or get_device()
    args, kwargs = _ttt_inputs(T, f, H, kind, device)
    z_p, state_p = ttt.ttt_primal(*args, mini_batch, **kwargs)
    z_d, state_d = ttt.ttt_dual(*args, mini_batch, **kwargs)
    diffs = [(z_p - z_d).abs().max()] + [(a - b).abs().max() for pa, pd in zip(state_p, state_d) for a, b in zip(pa, pd)]
    primal = _best_time(lambda: ttt.ttt_primal(*args, mini_batch, **kwargs), repeats, device)
    dual = _best_time(lambda: ttt.ttt_dual(*args, mini_batch, **kwargs), repeats, device)
    return {"max_abs_err": max(d.item() for d in diffs), "primal_seconds": primal, "dual_seconds": dual,
            "speedup": primal / dual}


# --- 3. the mini-batch dial with hand-made views --------------------------------------------------


@torch.no_grad()
def inner_loop_errors(batch, eta: float, mini_batch: int) -> torch.Tensor:
    """MSE of predicting each ``y_i`` by the TTT inner loop with hand-made views: (n,).

    Keys ``x_i``, values ``y_i`` (in the first of ``d`` slots), queries ``x_{i+1}``: the state after
    pair ``i`` predicts ``y_{i+1}``; ``y_1`` is predicted by ``W0 = 0``. No LayerNorm, no residual.
    """
    xs, ys = batch.xs, batch.ys  # (B, n, d), (B, n)
    B, n, d = xs.shape
    k = xs[:, None]  # (B, 1, n, d): one head
    v = torch.nn.functional.pad(ys[:, None, :, None], (0, d - 1))  # (B, 1, n, d): (y_i, 0, ..., 0)
    q = torch.cat([xs[:, 1:], xs[:, -1:]], dim=1)[:, None]  # (B, 1, n, d): the next input
    eta_t = torch.full((B, 1, n), float(eta), dtype=xs.dtype, device=xs.device)
    zero = [(torch.zeros(1, d, d, dtype=xs.dtype, device=xs.device), None)]
    z, _ = ttt.ttt_dual(q, k, v, eta_t, zero, mini_batch=mini_batch)  # (B, 1, n, d)
    y_hat = torch.cat([torch.zeros_like(ys[:, :1]), z[:, 0, :-1, 0]], dim=1)  # (B, n): shifted by one pair
    return ((y_hat - ys) ** 2).mean(0)


def mini_batch_dial(batch, mini_batches, etas) -> dict:
    """For every ``b``: the error curve at every ``eta`` and the best ``eta`` for the last quarter."""
    n = batch.xs.shape[1]
    last = slice(n - n // 4, n)
    curves = {b: {eta: inner_loop_errors(batch, eta, b) for eta in etas} for b in mini_batches}
    best = {}
    for b, by_eta in curves.items():
        eta = min(by_eta, key=lambda e: by_eta[e][last].mean().item() if torch.isfinite(by_eta[e]).all() else float("inf"))
        best[b] = {"eta": eta, "error": by_eta[eta][last].mean().item(), "curve": by_eta[eta].tolist()}
    return {"curves": {b: {e: c.tolist() for e, c in by_eta.items()} for b, by_eta in curves.items()}, "best": best}


# --- 4. the outer loop ----------------------------------------------------------------------------


def make_model(config: TTTConfig, mixer: str, mini_batch: int | None = None, **mixer_kwargs) -> SequenceModel:
    """A sequence model with ``mixer`` at the config's size (the init depends on ``config.seed`` only);
    ``mixer_kwargs`` go to the TTT mixer (e.g. ``inner_steps``, ``eta_base``, ``learn_w0``)."""
    task = SequenceRegressionTask(config.d, config.n_points, config.noise)
    extra = {"eta_base": config.mlp_eta_base, "inner_std": config.mlp_inner_std} if mixer.startswith("ttt-mlp") else {}
    return SequenceModel(task.token_dim, 1, mixer, width=config.width, n_layers=config.n_layers,
                         n_heads=config.n_heads, mini_batch=mini_batch or config.mini_batch, seed=config.seed,
                         **extra, **mixer_kwargs)


# --- 5. cost against sequence length --------------------------------------------------------------


@torch.no_grad()
def mixer_costs(lengths, f: int = 64, H: int = 4, repeats: int = 3, device=None) -> dict:
    """Forward time per token (microseconds) and state size (floats per sequence) of each mixer's core.

    One sequence, ``H`` heads of ``f`` features; the TTT layers with the inner LayerNorm and residual.
    """
    device = device or get_device()
    names = ("linear-attention", "delta-rule", "ttt-linear", "ttt-mlp", "softmax")
    out = {"length": list(lengths), "us_per_token": {m: [] for m in names}, "state_floats": {m: [] for m in names}}
    for T in lengths:
        (q, k, v, eta, lin), kw = _ttt_inputs(T, f, H, "linear", device)
        (_, _, _, _, mlp), _ = _ttt_inputs(T, f, H, "mlp", device)
        beta = 2 * eta * f  # (1, H, T) in (0, 2)
        runs = {
            "linear-attention": lambda: ttt.linear_attention_chunked(q, k, v, 64),
            "delta-rule": lambda: ttt.delta_rule_chunked(q, k, v, beta.clamp(max=1), 16),
            "ttt-linear": lambda: ttt.ttt_dual(q, k, v, eta, lin, 16, **kw),
            "ttt-mlp": lambda: ttt.ttt_dual(q, k, v, eta, mlp, 16, **kw),
            "softmax": lambda: (ttt.softmax_attention(q, k, v), (k, v)),  # the state is the key-value cache
        }
        for name, fn in runs.items():
            state = fn()[1]
            tensors = [t for pair in state for t in pair if t is not None] if isinstance(state, list) else (
                list(state) if isinstance(state, tuple) else [state])
            out["state_floats"][name].append(sum(t.numel() for t in tensors))
            out["us_per_token"][name].append(1e6 * _best_time(fn, repeats, device) / T)
    return out


# --- the shipped models: the dial after training and the inner loop's knobs ---------------------------


@torch.no_grad()
def value_scale(model: SequenceModel, task: SequenceRegressionTask, batch) -> dict[str, float]:
    """What the inner model of the first TTT layer is asked to fit at the y-tokens, and what it can output.

    The inner target is ``v`` for the bare inner model and ``v - k`` for ``f(k) = k + LN(f_res(k))``.
    Returns the correlation over y-tokens (and heads, averaged) of ``|y_i|`` with the target's norm,
    the coefficient of variation (std / mean) of the target's norm, and that of the norm of what the
    inner model outputs at ``W0`` (``f_res(k)``, or ``LN(f_res(k))``): the LayerNorm fixes the output's
    norm up to its gain, so an output whose norm cannot vary cannot carry ``|y|`` in its scale.
    """
    mixer = model.mixers[0]
    if not hasattr(mixer, "inner_params"):
        raise ValueError(f"model must have a TTT mixer, got {model.mixer_name!r}")
    x = model.norms[0](model.embed(task.tokens(batch)))  # (B, 2n, D): the mixer's input
    q, k, v = mixer.views(x)  # (B, H, 2n, f)
    k = torch.nn.functional.normalize(k, dim=-1) if mixer.normalize_qk else k
    k, v = k[:, :, 1::2], v[:, :, 1::2]  # the y-tokens: (B, H, n, f)
    target = v - k if mixer.inner_ln else v
    h, _, _ = ttt._forward(k, ttt._expand(mixer.inner_params(), k.shape[0]))
    out = ttt._layer_norm(h, (mixer.ln_weight, mixer.ln_bias))[0] if mixer.inner_ln else h
    t_norm, o_norm = target.norm(dim=-1), out.norm(dim=-1)  # (B, H, n)
    abs_y = batch.ys.abs()[:, None].expand_as(t_norm)  # (B, H, n)
    corr = [torch.corrcoef(torch.stack([abs_y[:, h].flatten(), t_norm[:, h].flatten()]))[0, 1].item()
            for h in range(t_norm.shape[1])]
    cv = lambda n: (n.std() / n.mean()).item()  # noqa: E731
    return {"corr_abs_y_target_norm": sum(corr) / len(corr), "target_norm_cv": cv(t_norm),
            "output_norm_cv": cv(o_norm)}


def _shipped(task, held_out, last) -> dict:
    """Held-out errors (last quarter) of every shipped sweep and knob model, by b or knob, one per seed,
    and the inner targets' scale of the b = 16 models and of the inner-LayerNorm knob."""
    names = set(pretrained.available("ttt/"))
    err = lambda model: task.error_by_position(model, held_out)[last].mean().item()  # noqa: E731
    out = {"sweep": {}, "sweep_lr": {}, "sweep_curves": {}, "knobs": {}, "scale": {}}
    for b in SWEEP_MINI_BATCHES:
        seeds = [s for s in SWEEP_SEEDS if sweep_name(b, s) in names]
        if not seeds:
            continue
        models = [pretrained.load(sweep_name(b, s)) for s in seeds]
        out["sweep"][b] = [err(m) for m in models]
        out["sweep_lr"][b] = pretrained.provenance(sweep_name(b, seeds[0]))["train_config"]["lr"]
        if b == CONFIGS["quick"].mini_batch:
            out["scale"]["ttt-linear"] = [value_scale(m, task, held_out) for m in models]
    for knob in KNOBS:
        seeds = [s for s in SWEEP_SEEDS if knob_name(knob, s) in names]
        if seeds:
            models = [pretrained.load(knob_name(knob, s)) for s in seeds]
            out["knobs"][knob] = [err(m) for m in models]
            if knob == "inner-ln":
                out["scale"]["ttt-linear-ln"] = [value_scale(m, task, held_out) for m in models]
    return out


# --- the whole experiment -------------------------------------------------------------------------


@dataclass
class TTTResult:
    config: TTTConfig
    models: dict[str, SequenceModel]  # trained, by mixer (on the CPU)
    histories: dict[str, History]  # training losses, by mixer
    error_by_position: dict[str, list[float]]  # held-out MSE for each y_i, by mixer (and "ridge")
    curves_by_seed: dict[str, list[list[float]]]  # the same for every seed of each mixer (seed first)
    mini_batch_errors: dict[int, float]  # ttt-linear's last-quarter error, by inner mini-batch b
    dial: dict  # the hand-made inner loop: curves and best eta per b
    costs: dict  # time per token and state size against sequence length
    metrics: dict

    def _training_figure(self):
        return _training_curves(self.histories)

    def figures(self) -> dict:
        """Every figure of the chapter, by name (what ``icl-course reproduce`` saves)."""
        m, n = self.metrics, self.config.n_points
        positions = list(range(1, n + 1))
        best = self.dial["best"]
        refs = {"ridge (Bayes optimal)": self.error_by_position["ridge"]}
        return {
            "inner_loop_dial": plots.curves(
                positions, {**{f"b = {b} (eta = {v['eta']:.3g})": v["curve"] for b, v in best.items()}, **refs},
                xlabel="position i of the pair", ylabel="MSE of y_i", logy=True,
                title="hand-made views: the inner loop alone",
            ),
            "training": self._training_figure(),
            "error_by_position": plots.curves(
                positions, {name: self.error_by_position[name] for name in self.config.mixers} | refs,
                xlabel="position i of the pair", ylabel="MSE of y_i", logy=True, title="trained models, held out",
            ),
            "gap_to_ridge": _gap_figure(positions, self.curves_by_seed, self.error_by_position["ridge"],
                                        self.config.n_points // 4),
            "icl_error": plots.bars(
                {"last quarter": {**m["icl_error"], "ridge": m["ridge_error"]}}, ylabel="MSE",
                title=f"in-context error (predicting 0: {m['zero_error']:.2f})",
                ylim=(0, 1.5 * max([*m["icl_error"].values(), m["ridge_error"]])),  # room for the legend
            ),
            "mini_batch": _sweep_figure(m, self.error_by_position["ridge"], self.config) if m["icl_error_by_mini_batch_trained"]
            else plots.curves(
                list(self.mini_batch_errors), {"ttt-linear (trained)": list(self.mini_batch_errors.values())} | {
                    name: [m["icl_error"][name]] * len(self.mini_batch_errors)
                    for name in ("delta-rule", "linear-attention") if name in m["icl_error"]},
                xlabel="inner mini-batch size b (tokens)", ylabel="MSE, last quarter", logx=True, logy=True,
                title="the mini-batch dial, trained",
            ),
            **({"recall": recall.recall_figure(
                {name: {int(k): v for k, v in by.items()} for name, by in m["recall_accuracy"].items()},
                MIXER_COLORS, features=m["recall_features_per_head"])} if m["recall_accuracy"] else {}),
            "cost": plots.panels(
                {"time per token (us)": self.costs["us_per_token"], "state (floats per sequence)": self.costs["state_floats"]},
                self.costs["length"], xlabel="sequence length T", logy=("time per token (us)", "state (floats per sequence)"),
                logx=True, marker="o", width=4.2,
            ),
        }


def _gap_figure(positions, curves_by_seed, ridge, last_n):
    """Every mixer's held-out error by position, mean over seeds with the range of the seeds shaded, and ridge."""
    fig, (ax,) = plots.figure(width=6.0, height=3.8)
    for name, curves in curves_by_seed.items():
        c = torch.tensor(curves)  # (seeds, n)
        (line,) = ax.plot(positions, c.mean(0), color=MIXER_COLORS.get(name), label=f"{name} ({len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(positions, c.min(0).values, c.max(0).values, color=line.get_color(), alpha=0.15)
    ax.plot(positions, ridge, "k--", label="ridge (Bayes optimal)")
    ax.axvspan(positions[-last_n] - 0.5, positions[-1] + 0.5, color="0.9", zorder=0)
    ax.set(xlabel="position i of the pair (i - 1 pairs seen)", ylabel="MSE of y_i", yscale="log",
           title="trained mixers against the optimum (shaded: last quarter)")
    ax.legend(fontsize=7, ncol=2)
    return fig


def _sweep_figure(m, ridge, config):
    """TTT-Linear's held-out error against its inner mini-batch b (shipped models, mean and std over
    seeds), beside the knobs of the inner loop at b = 16."""
    fig, (ax, bx) = plots.figure(ncols=2, width=5.2)
    sweep = m["icl_error_by_mini_batch_trained"]
    bs = [int(b) for b in sweep]
    stats = [torch.tensor(v) for v in sweep.values()]
    ax.errorbar(bs, [t.mean() for t in stats], yerr=[t.std() if len(t) > 1 else 0 for t in stats], marker="o",
                capsize=3, label="ttt-linear (trained)")
    for b, t in zip(bs, stats):
        ax.scatter([b] * len(t), t, s=8, color="0.5", zorder=3)
    ax.axhline(m["ridge_error"], color="k", ls="--", label="ridge")
    ax.set(xscale="log", yscale="log", xlabel="inner mini-batch size b (tokens)", ylabel="MSE, last quarter",
           title=f"the dial after training ({2 * config.n_points} tokens)")
    ax.legend(fontsize=8)
    knobs = {"b = 16 (baseline)": sweep.get(str(config.mini_batch), [])} | m["icl_error_by_knob"]
    knobs = {k: v for k, v in knobs.items() if v}
    names = list(knobs)
    means = [sum(v) / len(v) for v in knobs.values()]
    stds = [torch.tensor(v).std().item() if len(v) > 1 else 0 for v in knobs.values()]
    bx.barh(range(len(names)), means, xerr=stds, color="C1", capsize=3)
    for i, v in enumerate(knobs.values()):
        bx.scatter(v, [i] * len(v), s=8, color="k", zorder=3)
    bx.set_yticks(range(len(names)), names, fontsize=8)
    bx.axvline(m["ridge_error"], color="k", ls="--")
    bx.set(xscale="log", xlabel="MSE, last quarter", title="the inner loop's knobs (b = 16)")
    return fig


def _training_curves(histories: dict[str, History]):
    """Training loss of every model against its own steps (TTT-MLP may train longer)."""
    fig, (ax,) = plots.figure()
    for name, h in histories.items():
        ax.plot([s + 1 for s in h.steps], h.losses, label=name)
    ax.set(xlabel="outer step", ylabel="0.5·MSE (all positions)", yscale="log", title="outer loop")
    ax.legend(fontsize=8)
    return fig


def _train(config, task, mixer, b, lr, seed, label, device, progress, **mixer_kwargs):
    """One model of ``mixer`` (inner mini-batch ``b``) trained at ``lr``; init from ``seed``, training data
    from ``1000 * seed + config.seed + 1`` (``config.seed + 1`` at ``seed == config.seed == 0``)."""
    data_seed = config.seed + 1 if seed == config.seed else 1000 * seed + config.seed + 1
    train_config = TrainConfig(**{**asdict(config.train), "lr": lr, "seed": data_seed})
    model = make_model(replace(config, seed=seed), mixer, b, **mixer_kwargs)
    history = train(model, task, train_config, device=device, progress=progress and label)
    return model.eval(), history


def _train_all(config, task, validation, last, device, progress):
    """One model per mixer, and ttt-linear at the swept mini-batch sizes, on the same data and budget;
    each at the learning rate of ``config.lrs`` with the lowest validation error. Returns the models,
    their histories and the chosen rates."""
    runs = [(name, name, None) for name in config.mixers]
    runs += [(f"ttt-linear b={b}", "ttt-linear", b) for b in config.sweep_mini_batches if b != config.mini_batch]
    models, histories, chosen = {}, {}, {}
    for label, mixer, b in runs:
        tried = {}
        for lr in config.lrs or (config.train.lr,):
            model, history = _train(config, task, mixer, b, lr, config.seed, f"{label} lr={lr:g}", device, progress)
            tried[lr] = (task.error_by_position(model, validation)[last].mean().item(), model, history)
        chosen[label] = min(tried, key=lambda lr: tried[lr][0])
        _, models[label], histories[label] = tried[chosen[label]]
    return models, histories, chosen


def _spread(config, task, held_out, chosen, device, progress) -> dict[str, list[list[float]]]:
    """Held-out error by position of every mixer retrained at ``config.spread_seeds``, at its chosen rate,
    the seeds each of those curves comes from, and the runs that diverged."""
    out, seeds, diverged = {}, {}, []
    for name in config.mixers:
        for seed in config.spread_seeds:
            try:
                model, _ = _train(config, task, name, None, chosen[name], seed, f"{name} seed {seed}", device, progress)
            except TrainingDiverged:  # reported, never dropped silently
                diverged.append(f"{name} seed {seed}")
                continue
            out.setdefault(name, []).append(task.error_by_position(model, held_out).tolist())
            seeds.setdefault(name, []).append(seed)
    return out, seeds, diverged


def ridge_points_to_match(ridge_curve: list[float], error: float) -> int | None:
    """How many pairs the Bayes-optimal ridge predictor needs to reach ``error``: the smallest ``i - 1``
    with ``ridge_curve[i - 1] <= error`` (position ``i`` has seen ``i - 1`` pairs); None if it never does."""
    return next((i for i, r in enumerate(ridge_curve) if r <= error), None)


def _mean_curves(curves: list[list[float]]) -> list[float]:
    return torch.tensor(curves).mean(0).tolist()


def run(profile: str | None = None, progress: bool = False, config: TTTConfig | None = None) -> TTTResult:
    """Identities, primal vs dual, the hand-made dial, the outer loop and the cost curves."""
    profile = get_profile(profile)
    config = config or CONFIGS[profile]
    device = get_device()
    task = SequenceRegressionTask(config.d, config.n_points, config.noise)
    held_out = task.sample(config.n_eval, generator(config.seed + 2), device=device)
    last = slice(config.n_points - config.n_points // 4, config.n_points)

    identities = identity_errors(config.seed)
    timing = {kind: primal_dual(config.timing_length, config.timing_features, config.timing_heads, 16, kind,
                                config.timing_repeats, device) for kind in ("linear", "mlp")}
    dial = mini_batch_dial(held_out, config.dial_mini_batches, config.dial_etas)

    validation = task.sample(config.n_eval, generator(config.seed + 5), device=device)  # for the rates only
    models, histories, chosen = _train_all(config, task, validation, last, device, progress)
    squared = {name: task.squared_errors(model, held_out) for name, model in models.items()}  # (B, n) each
    errors = {name: sq.mean(0).tolist() for name, sq in squared.items()}
    # the standard error of each mixer's error over the last quarter, over the held-out sequences
    error_se = {name: standard_error(sq[:, last].mean(1)) for name, sq in squared.items()}
    errors["ridge"] = ridge_by_position(task, held_out.to("cpu")).tolist()
    mean_last = lambda curve: sum(curve[last]) / len(curve[last])  # noqa: E731
    mini_batch_errors = {config.mini_batch: mean_last(errors["ttt-linear"])} if "ttt-linear" in errors else {}
    mini_batch_errors.update({b: mean_last(errors[f"ttt-linear b={b}"]) for b in config.sweep_mini_batches
                              if b != config.mini_batch})
    mini_batch_errors = dict(sorted(mini_batch_errors.items()))
    spread, spread_seeds, diverged = _spread(config, task, held_out, chosen, device, progress)
    curves_by_seed = {name: [errors[name], *spread.get(name, [])] for name in config.mixers}  # per position
    mean_curves = {name: _mean_curves(c) for name, c in curves_by_seed.items()}
    by_seed = {name: [mean_last(c) for c in curves] for name, curves in curves_by_seed.items()}
    ridge_last = mean_last(errors["ridge"])
    shipped = _shipped(task, held_out.to("cpu"), last) if config.shipped else {}
    costs = mixer_costs(config.cost_lengths, config.timing_features, config.timing_heads, config.cost_repeats, device)
    recalled = recall.shipped(n=config.recall_eval)

    metrics = {
        "linear_attention_equivalence_max_abs_err": max(identities["full_batch_step_equivalence_max_abs_err"],
                                                        identities["causal_linear_attention_equivalence_max_abs_err"]),
        **identities,
        "primal_dual_max_abs_err": timing["linear"]["max_abs_err"],
        "primal_dual_max_abs_err_mlp": timing["mlp"]["max_abs_err"],
        "primal_seconds": timing["linear"]["primal_seconds"],
        "dual_seconds": timing["linear"]["dual_seconds"],
        "dual_speedup": timing["linear"]["speedup"],
        "dual_speedup_mlp": timing["mlp"]["speedup"],
        "timing_length": config.timing_length,
        "icl_error": {name: mean_last(errors[name]) for name in config.mixers},
        "icl_error_se": {name: error_se[name] for name in config.mixers},
        "icl_error_by_seed": by_seed,
        # the seed of each entry of icl_error_by_seed (a run that diverged leaves its seed out)
        "seeds_by_mixer": {name: [config.seed, *spread_seeds.get(name, [])] for name in config.mixers},
        # where the trained mixers stand against the optimum: each mixer's curve averaged over the seeds,
        # its last-quarter error over ridge's (per seed), and how many pairs ridge needs to do as well
        "error_by_position_mean": mean_curves,
        "ridge_by_position": errors["ridge"],
        "icl_error_over_ridge_by_seed": {name: [e / ridge_last for e in v] for name, v in by_seed.items()},
        "ridge_points_to_match": {name: ridge_points_to_match(errors["ridge"], sum(v) / len(v))
                                  for name, v in by_seed.items()},
        "seeds": [config.seed, *config.spread_seeds],
        "diverged": diverged,  # spread runs whose outer loop diverged (left out of the spreads)
        "chosen_lr": chosen,
        "lrs": list(config.lrs or (config.train.lr,)),
        "icl_error_by_mini_batch": {str(b): e for b, e in mini_batch_errors.items()},
        "ridge_error": mean_last(errors["ridge"]),
        "zero_error": held_out.ys.var().item(),
        "dial_best": {str(b): {"eta": v["eta"], "error": v["error"]} for b, v in dial["best"].items()},
        # the shipped TTT-Linear models (quick task and budget, 3 seeds each): error by inner mini-batch b,
        # and by knob of the inner loop (the baseline is b = 16), one value per seed
        "icl_error_by_mini_batch_trained": {str(b): v for b, v in shipped.get("sweep", {}).items()},
        "chosen_lr_by_mini_batch": {str(b): v for b, v in shipped.get("sweep_lr", {}).items()},
        "icl_error_by_knob": shipped.get("knobs", {}),
        "inner_target_scale": {name: {key: [r[key] for r in rows] for key in rows[0]}
                               for name, rows in shipped.get("scale", {}).items()},
        # associative recall (shipped models, 3 seeds each): test accuracy by mixer and pair count, per seed
        "recall_accuracy": {name: {str(k): v for k, v in by.items()} for name, by in recalled["accuracy"].items()},
        "recall_accuracy_se": {name: {str(k): v for k, v in by.items()} for name, by in recalled["se"].items()},
        "recall_lr": recalled["lr"],
        "recall_retried": recalled["retried"],  # seeds whose training diverged and ran again at half the rate
        "recall_long": recall.LONG,  # the budget of "ttt-mlp-long"
        "recall_train_pairs": list(recall.TASK.pairs),
        "recall_features_per_head": recall.MODEL["width"] // recall.MODEL["n_heads"],
        "recall_n_eval": config.recall_eval,
        "us_per_token": costs["us_per_token"],
        "state_floats": costs["state_floats"],
        "cost_lengths": list(config.cost_lengths),
        "train_steps": config.train.steps,
        "train_seconds": {name: h.seconds for name, h in histories.items()},
        "n_eval": config.n_eval,
        "profile": profile,
        "device": str(device),
    }
    return TTTResult(config=config, models={k: v.cpu() for k, v in models.items()}, histories=histories,
                     error_by_position=errors, curves_by_seed=curves_by_seed,
                     mini_batch_errors=mini_batch_errors, dial=dial, costs=costs,
                     metrics=Lookup.deep(metrics))


# --- shipped weights: the mini-batch dial after training -------------------------------------------

SWEEP_MINI_BATCHES = (1, 2, 4, 8, 16, 32, 64)  # TTT-Linear's inner mini-batch b; 64 = the whole sequence
SWEEP_SEEDS = (0, 1, 2)
SWEEP_COMMAND = "python -m icl_course.topics.ttt.experiment --write-sweep"


def sweep_name(b: int, seed: int) -> str:
    """The shipped weights of TTT-Linear trained at inner mini-batch ``b`` from ``seed``."""
    return f"ttt/ttt-linear-b{b}-seed{seed}"


def _ship(name, model, history, task, held_out, last, config, mini_batch, lr, seed, selection, command,
          folder, **extra) -> float:
    """Save a model trained on the quick task with its provenance record: its last-quarter error on the
    chapter's held-out sequences, the settings it was trained with and how it was chosen (``extra``: more
    fields). Returns that error."""
    import platform

    squared = task.squared_errors(model, held_out)[:, last].mean(1)  # (B,)
    record = {
        "task": asdict(task), **extra,
        "config": {"width": config.width, "n_layers": config.n_layers, "n_heads": config.n_heads,
                   "mini_batch": mini_batch},
        "train_config": {**asdict(config.train), "lr": lr}, "seed": seed,
        "train_seconds": history.seconds, "final_train_loss": history.losses[-1],
        "metrics": {"icl_error": squared.mean().item(), "icl_error_se": standard_error(squared)},
        "eval": {"n_eval": config.n_eval, "generator": config.seed + 2, "positions": "last quarter"},
        "selection": selection, "command": command,
        "torch": torch.__version__, "platform": platform.platform(),
    }
    pretrained.save(name, model, record, folder=folder)
    return record["metrics"]["icl_error"]


def train_mini_batch_sweep(folder=None, progress: bool = False, mini_batches=SWEEP_MINI_BATCHES,
                           seeds=SWEEP_SEEDS) -> dict:
    """Train TTT-Linear at every ``b`` of ``mini_batches`` on the ``quick`` task and budget, and save it.

    For each ``b`` the outer learning rate is chosen among the quick profile's ``lrs`` by the error over
    the last quarter on validation sequences (generator ``seed + 5``), at seed 0; the other seeds are
    trained at that rate. Each model is scored on the chapter's held-out sequences (generator
    ``seed + 2``). ``folder=None`` writes into the package. Returns ``{b: [error per seed]}``.
    """
    config = CONFIGS["quick"]
    device = torch.device("cpu")
    task = SequenceRegressionTask(config.d, config.n_points, config.noise)
    held_out = task.sample(config.n_eval, generator(config.seed + 2))
    validation = task.sample(config.n_eval, generator(config.seed + 5))
    last = slice(config.n_points - config.n_points // 4, config.n_points)
    out = {}
    for b in mini_batches:
        tried = []
        for lr in config.lrs:
            model, history = _train(config, task, "ttt-linear", b, lr, seeds[0], f"b={b} lr={lr:g}", device, progress)
            tried.append((lr, task.error_by_position(model, validation)[last].mean().item(), model, history))
        chosen = min(range(len(tried)), key=lambda i: (tried[i][1], i))
        selection = {"rule": f"outer learning rate among {list(config.lrs)}, lowest validation error at seed {seeds[0]}",
                     "runs": {str(i): {"lr": lr, "validation": v} for i, (lr, v, _, _) in enumerate(tried)},
                     "chosen": chosen, "better": "lower",
                     "validation": {"generator": config.seed + 5, "n": config.n_eval},
                     "test": {"generator": config.seed + 2, "n": config.n_eval}}
        lr = tried[chosen][0]
        for seed in seeds:
            if seed == seeds[0]:
                model, history = tried[chosen][2], tried[chosen][3]
            else:
                model, history = _train(config, task, "ttt-linear", b, lr, seed, f"b={b} seed {seed}", device, progress)
            error = _ship(sweep_name(b, seed), model, history, task, held_out, last, config, b, lr, seed,
                          selection, SWEEP_COMMAND, folder)
            out.setdefault(b, []).append(error)
            if progress:
                print(f"b={b} seed {seed} lr {lr:g}: {error:.4f}", flush=True)
    return out


# The inner loop's own knobs, each changed alone from TTT-Linear at b = 16 (the sweep's b = 16 models are
# the baseline): MTTT's inner epochs, the inner learning-rate scale, the paper's inner LayerNorm and
# residual, and W0 fixed at 0 instead of learned.
KNOBS = {
    "epochs-2": ("ttt-linear", {"inner_steps": 2}),
    "epochs-3": ("ttt-linear", {"inner_steps": 3}),
    "epochs-4": ("ttt-linear", {"inner_steps": 4}),
    "eta-0.25": ("ttt-linear", {"eta_base": 0.25}),
    "eta-4": ("ttt-linear", {"eta_base": 4.0}),
    "inner-ln": ("ttt-linear-ln", {}),
    "fixed-w0": ("ttt-linear", {"learn_w0": False}),
}
KNOBS_COMMAND = "python -m icl_course.topics.ttt.experiment --write-knobs"


def knob_name(knob: str, seed: int) -> str:
    return f"ttt/knob-{knob}-seed{seed}"


def train_knobs(folder=None, progress: bool = False, knobs=tuple(KNOBS), seeds=SWEEP_SEEDS) -> dict:
    """Train every knob of :data:`KNOBS` at ``seeds`` on the quick task and budget, at the outer learning
    rate chosen for the b = 16 sweep model (nothing chosen here), and save it. Returns ``{knob: [errors]}``."""
    config = CONFIGS["quick"]
    device = torch.device("cpu")
    task = SequenceRegressionTask(config.d, config.n_points, config.noise)
    held_out = task.sample(config.n_eval, generator(config.seed + 2))
    last = slice(config.n_points - config.n_points // 4, config.n_points)
    lr = pretrained.provenance(sweep_name(config.mini_batch, seeds[0]), folder)["train_config"]["lr"]
    out = {}
    for knob in knobs:
        mixer, kwargs = KNOBS[knob]
        for seed in seeds:
            model, history = _train(config, task, mixer, config.mini_batch, lr, seed, f"{knob} seed {seed}", device,
                                    progress, **kwargs)
            error = _ship(knob_name(knob, seed), model, history, task, held_out, last, config, config.mini_batch,
                          lr, seed, pretrained.one_run(seed), KNOBS_COMMAND, folder, knob=knob, mixer=mixer,
                          mixer_kwargs=kwargs,
                          lr_from=f"the validation choice of {sweep_name(config.mini_batch, seeds[0])}")
            out.setdefault(knob, []).append(error)
            if progress:
                print(f"{knob} seed {seed}: {error:.4f}", flush=True)
    return out


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    if "--write-sweep" in sys.argv:
        print(train_mini_batch_sweep(progress=True))
    if "--write-knobs" in sys.argv:
        print(train_knobs(progress=True))
