"""One layer of softmax self-attention on the chapter's regression task, with one or more heads.

The layer has the shape of :class:`~icl_course.linear_transformer.FullAttention` with the softmax
put back over the context: every token ``z_t`` (rows of ``Z``, shape ``(B, n+1, D)``, ``D = d+1``)
gets

    z_t <- z_t + sum_h sum_{j <= n} softmax_j(z_t^T Q_h c_j) P_h c_j ,

where ``c_j`` are the n context tokens (the query is no key or value, as in the linear layer) and
``Q_h``, ``P_h`` are the merged ``W_K^T W_Q`` and ``W_P W_V`` of head ``h``. The softmax weights
sum to one, so one head averages its values: it cannot form the sum ``(1/n) sum_j y_j x_j^T x_q``
of a GD step exactly, only to first order in small scores, ``softmax_j(s) ~ (1 + s_j - mean s) / n``,
which brings along a term in ``mean_j y_j`` that GD does not have. Two heads can cancel it (one
with the opposite values and flat scores). The prediction is read as for the linear models: minus
the query's y-slot. von Oswald et al. 2023 (arXiv 2212.07677) compare such softmax layers with
linear self-attention and GD in their appendix.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dataclasses import dataclass, replace
from pathlib import Path

from icl_course import pretrained
from icl_course.metrics import model_cosine, per_sequence_losses, standard_error
from icl_course.results import mean_std
from icl_course.runtime import generator, require_finite
from icl_course.tasks import RegressionTask, Uniform
from icl_course.tokens import check_shapes, make_tokens, read_prediction
from icl_course.training import TrainConfig, train

__all__ = ["SoftmaxAttention", "SoftmaxTransformer", "softmax_transformer", "SoftmaxSpec", "SoftmaxConfig",
           "train_softmax", "run_softmax", "write_weights"]


class SoftmaxAttention(nn.Module):
    """One softmax self-attention layer with ``n_heads`` heads of merged ``(Q_h, P_h)``, each ``(D, D)``."""

    def __init__(self, d: int, n_heads: int = 1, init_std: float = 1e-3, gen: torch.Generator | None = None):
        super().__init__()
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"d must be an integer >= 1, got {d!r}")
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
            raise ValueError(f"n_heads must be an integer >= 1, got {n_heads!r}")
        require_finite("init_std", init_std, at_least=0)
        self.d, self.n_heads = d, n_heads
        D = d + 1
        self.Q = nn.Parameter(init_std * torch.randn(n_heads, D, D, generator=gen))
        self.P = nn.Parameter(init_std * torch.randn(n_heads, D, D, generator=gen))

    def forward(self, Z: Tensor) -> Tensor:
        if not torch.is_tensor(Z) or Z.ndim != 3 or Z.shape[-1] != self.d + 1 or Z.shape[1] < 2:
            raise ValueError(f"Z must have shape (B, n+1, {self.d + 1}) with n >= 1, got {tuple(getattr(Z, 'shape', ()))}")
        n = Z.shape[1] - 1
        C = Z[:, :n]  # (B, n, D): the context tokens are the keys and the values
        queries = torch.einsum("btd,hde->bhte", Z, self.Q)  # (B, H, n+1, D): Q_h^T z_t
        scores = queries @ C[:, None].transpose(-1, -2)  # (B, H, n+1, D) @ (B, 1, D, n) -> (B, H, n+1, n)
        values = torch.einsum("bje,hge->bhjg", C, self.P)  # (B, H, n, D): P_h c_j
        update = scores.softmax(dim=-1) @ values  # softmax over the context: (B, H, n+1, D)
        return Z + update.sum(dim=1)  # summed over heads: (B, n+1, D)


class SoftmaxTransformer(nn.Module):
    """One :class:`SoftmaxAttention` layer with the package's predictor call and minus-y-slot read-out."""

    def __init__(self, layer: SoftmaxAttention):
        super().__init__()
        if not isinstance(layer, SoftmaxAttention):
            raise ValueError(f"layer must be a SoftmaxAttention, got {type(layer).__name__}")
        self.layer, self.d = layer, layer.d

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.Q.dtype

    @property
    def args(self) -> dict:
        """The arguments of :func:`softmax_transformer` that rebuild it (all but its initialisation)."""
        return {"d": self.d, "n_heads": self.layer.n_heads}

    def forward(self, Z: Tensor) -> Tensor:
        return self.layer(Z)

    def predict(self, xs: Tensor, ys: Tensor, x_query: Tensor) -> Tensor:
        """``(B, n, d), (B, n), (B, d) -> (B,)``, on the device of the inputs (the model's)."""
        if torch.is_tensor(xs) and (xs.ndim != 3 or xs.shape[-1] != self.d):
            raise ValueError(f"xs must have shape (B, n, d={self.d}), got {tuple(xs.shape)}")
        check_shapes(xs, ys, x_query, dtype=self.dtype)
        return read_prediction(self(make_tokens(xs, ys, x_query)))


def softmax_transformer(d: int, n_heads: int = 1, init_std: float = 1e-3, seed: int = 0) -> SoftmaxTransformer:
    """A freshly initialised one-layer softmax-attention model.

    >>> model = softmax_transformer(d=3, n_heads=2)
    >>> model.predict(torch.zeros(4, 5, 3), torch.zeros(4, 5), torch.zeros(4, 3)).shape
    torch.Size([4])
    """
    return SoftmaxTransformer(SoftmaxAttention(d, n_heads, init_std, generator(seed)))


pretrained.register(SoftmaxTransformer, build=softmax_transformer)

D, N_CTX, INPUT_RANGE = 10, 10, 0.5  # the chapter's task
# A higher rate than the linear layer's: at 1e-2 the two-head model is still improving after 1500
# steps; 3e-2 with a cosine decay brings it close to its plateau.
TRAIN = TrainConfig(steps=3000, batch_size=1024, lr=3e-2, schedule="cosine", min_lr_frac=0.01)


def make_task() -> RegressionTask:
    return RegressionTask(d=D, n_ctx=N_CTX, inputs=Uniform(-INPUT_RANGE, INPUT_RANGE))


@dataclass(frozen=True)
class SoftmaxSpec:
    """One trained softmax-attention model: its head count and seed."""

    n_heads: int
    seed: int

    @property
    def name(self) -> str:
        return f"gd_step/softmax-{self.n_heads}heads-seed{self.seed}"

    @property
    def train_config(self) -> TrainConfig:
        return replace(TRAIN, seed=100 + self.seed)  # init from seed, training stream from 100 + seed


def train_softmax(spec: SoftmaxSpec, device=None, progress: bool = False) -> tuple[SoftmaxTransformer, dict]:
    """Train ``spec``'s model on the chapter's task: ``(model, provenance)``."""
    model = softmax_transformer(D, spec.n_heads, init_std=1e-3, seed=spec.seed)
    config = spec.train_config
    history = train(model, make_task(), config, device=device,
                    progress=progress and f"softmax, {spec.n_heads} head(s), seed {spec.seed}")
    record = {
        "task": {"d": D, "n_ctx": N_CTX, "inputs": f"U(-{INPUT_RANGE}, {INPUT_RANGE})", "weights": "N(0, I)", "noise": 0.0},
        "train": {**vars(config), "init_std": 1e-3, "init_seed": spec.seed, "seconds": history.seconds},
        "metrics": {"final_train_loss": history.losses[-1]},
        "selection": pretrained.one_run(spec.seed),
        "command": "python -m icl_course.topics.gd_step.softmax",
    }
    return model.cpu().eval(), record


@dataclass(frozen=True)
class SoftmaxConfig:
    heads: tuple[int, ...] = (1, 2)
    seeds: tuple[int, ...] = (0, 1, 2)
    source: str = "shipped"  # "shipped": load the package's weights; "train": train them here


def run_softmax(config: SoftmaxConfig, batch, gd, device=None, progress: bool = False) -> dict:
    """Every softmax model of ``config`` scored on ``batch`` beside the one-step GD learner ``gd``.

    Returns the chapter's metrics: ``softmax_loss`` (mean over seeds) keyed by heads, its spread
    over seeds and standard error (seed ``config.seeds[0]``), its ratio to ``gd``'s loss and the
    cosine of the implicit models ``d y_hat / d x_q``.
    """
    if config.source not in ("shipped", "train"):
        raise ValueError(f"source must be 'shipped' or 'train', got {config.source!r}")
    gd_loss = per_sequence_losses(gd, batch).mean().item()
    m = {key: {} for key in ("softmax_loss", "softmax_loss_std", "softmax_loss_se", "softmax_over_gd",
                             "softmax_cosine_gd", "softmax_loss_by_seed")}
    for heads in config.heads:
        losses, ses, cosines = [], [], []
        for seed in config.seeds:
            spec = SoftmaxSpec(heads, seed)
            model = (pretrained.load(spec.name) if config.source == "shipped"
                     else train_softmax(spec, device, progress)[0]).to(device)
            errors = per_sequence_losses(model, batch)
            losses.append(errors.mean().item())
            ses.append(standard_error(errors))
            cosines.append(model_cosine(model, gd, batch))
        s, key = mean_std(losses), str(heads)
        m["softmax_loss"][key], m["softmax_loss_std"][key], m["softmax_loss_se"][key] = s["mean"], s["std"], ses[0]
        m["softmax_over_gd"][key] = s["mean"] / gd_loss
        m["softmax_cosine_gd"][key] = mean_std(cosines)["mean"]
        m["softmax_loss_by_seed"][key] = losses
    return {**m, "softmax_seeds": list(config.seeds), "softmax_source": config.source}


def write_weights(specs: list[SoftmaxSpec] | None = None, folder: Path | None = None, progress: bool = True) -> list[dict]:
    """Train the shipped softmax models and save them (``folder=None``: into the package)."""
    records = []
    for spec in specs or [SoftmaxSpec(h, s) for h in (1, 2) for s in (0, 1, 2)]:
        model, record = train_softmax(spec, device="cpu", progress=progress)
        pretrained.save(spec.name, model, record, folder=folder)
        records.append(record)
    return records


if __name__ == "__main__":  # retrain the shipped weights: python -m icl_course.topics.gd_step.softmax
    torch.set_num_threads(1)
    # through the package's module, so the records name the class icl_course.topics.gd_step.softmax.*
    from icl_course.topics.gd_step import softmax as module

    for spec in [module.SoftmaxSpec(h, s) for s in (0, 1, 2) for h in (1, 2)]:
        print(spec.name, module.write_weights([spec], progress=False)[0]["metrics"], flush=True)
