"""Outer optimizers as small update rules, optax-style: GD, sign descent and Adam.

An *update rule* turns gradients into parameter updates and carries its own state::

    state = rule.init(params)
    updates, state = rule.update(grads, state)
    params = apply_updates(params, updates)          # p + u for every tensor

``params``, ``grads`` and ``updates`` are lists of tensors in the same order. Named rules are short
chains of primitives, as in optax (``sign_descent = chain(scale_by_sign(), scale_by_learning_rate(lr))``),
so "Adam with beta1 = beta2 = 0 is sign descent" is a statement about two chains that differ in one
link, and a test checks it. Rules are pure: they never touch the tensors they are given.

A rule trains a model through the package's one training loop: :class:`RuleOptimizer` makes it a
``torch.optim.Optimizer`` for :func:`icl_course.training.train` (``optimizer=RuleOptimizer(
model.parameters(), sign_descent(lr))``), with its divergence checks, checkpoints and progress bar.
:func:`minimize` is the same loop on a loss of plain tensors (a quadratic, in the exercises).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from icl_course.training import History, TrainConfig, train

__all__ = [
    "UpdateRule",
    "chain",
    "scale_by_learning_rate",
    "scale_by_sign",
    "scale_by_adam",
    "gd",
    "sign_descent",
    "adam",
    "apply_updates",
    "RuleOptimizer",
    "minimize",
]

Tensors = list[Tensor]


@dataclass(frozen=True)
class UpdateRule:
    """A pair of pure functions: ``init(params) -> state`` and ``update(grads, state) -> (updates, state)``."""

    init: Callable[[Tensors], Any]
    update: Callable[[Tensors, Any], tuple[Tensors, Any]]
    name: str = "a custom rule"  # what it is, with its settings (checkpoints tell rules apart by it)


def chain(*rules: UpdateRule) -> UpdateRule:
    """Apply ``rules`` one after the other; each sees the previous one's output as its gradients."""

    def init(params):
        return tuple(rule.init(params) for rule in rules)

    def update(grads, state):
        new_state = []
        for rule, s in zip(rules, state):
            grads, s = rule.update(grads, s)
            new_state.append(s)
        return grads, tuple(new_state)

    return UpdateRule(init, update, f"chain({', '.join(rule.name for rule in rules)})")


# --- primitives ---------------------------------------------------------------------------------


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def scale_by_learning_rate(lr: float) -> UpdateRule:
    """``u = -lr * g``: the descent step (the minus sign lives here and only here)."""
    _positive("lr", lr)
    return UpdateRule(lambda params: None, lambda grads, state: ([-lr * g for g in grads], state),
                      f"scale_by_learning_rate({lr!r})")


def scale_by_sign() -> UpdateRule:
    """``u = sign(g)`` entrywise (``sign(0) = 0``): every coordinate moves by the same amount."""
    return UpdateRule(lambda params: None, lambda grads, state: ([torch.sign(g) for g in grads], state), "scale_by_sign()")


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> UpdateRule:
    """Adam's rescaling (Kingma & Ba 2015, Alg. 1), before the learning rate:

    ``m_t = b1 m_{t-1} + (1 - b1) g``, ``v_t = b2 v_{t-1} + (1 - b2) g^2``,
    ``u = m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m_t / (1 - b1^t)``, ``v_hat = v_t / (1 - b2^t)``.

    With ``b1 = b2 = 0``: ``u = g / (|g| + eps)``, which is ``sign(g)`` up to ``eps``.
    """
    for name, b in (("b1", b1), ("b2", b2)):
        if not (isinstance(b, (int, float)) and 0 <= b < 1):
            raise ValueError(f"{name} must be in [0, 1), got {b!r}")
    if not (isinstance(eps, (int, float)) and 0 <= eps < math.inf):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")

    def init(params):
        return 0, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]

    def update(grads, state):
        t, ms, vs = state
        t += 1
        ms = [b1 * m + (1 - b1) * g for m, g in zip(ms, grads)]
        vs = [b2 * v + (1 - b2) * g * g for v, g in zip(vs, grads)]
        c1, c2 = 1 - b1**t, 1 - b2**t  # bias corrections
        updates = [(m / c1) / ((v / c2).sqrt() + eps) for m, v in zip(ms, vs)]
        return updates, (t, ms, vs)

    return UpdateRule(init, update, f"scale_by_adam({b1!r}, {b2!r}, {eps!r})")


# --- named rules ---------------------------------------------------------------------------------


def gd(lr: float) -> UpdateRule:
    """Gradient descent: ``w <- w - lr * g``.

    >>> w = [torch.tensor([1.0, -2.0])]
    >>> rule = gd(0.5); state = rule.init(w)
    >>> u, state = rule.update([torch.tensor([2.0, -4.0])], state)
    >>> apply_updates(w, u)[0].tolist()
    [0.0, 0.0]
    """
    return chain(scale_by_learning_rate(lr))


def sign_descent(lr: float) -> UpdateRule:
    """Sign gradient descent (signSGD, Bernstein et al. 2018): ``w <- w - lr * sign(g)``.

    >>> rule = sign_descent(0.5); state = rule.init([torch.zeros(3)])
    >>> rule.update([torch.tensor([3.0, -1e-9, 0.0])], state)[0][0].tolist()  # tiny or large, same step
    [-0.5, 0.5, -0.0]
    """
    return chain(scale_by_sign(), scale_by_learning_rate(lr))


def adam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> UpdateRule:
    """Adam: ``w <- w - lr * m_hat / (sqrt(v_hat) + eps)`` (see :func:`scale_by_adam`)."""
    return chain(scale_by_adam(b1, b2, eps), scale_by_learning_rate(lr))


def apply_updates(params: Tensors, updates: Tensors) -> Tensors:
    """``p + u`` for every pair (new tensors; the inputs are left alone)."""
    return [p + u for p, u in zip(params, updates)]


# --- running a rule --------------------------------------------------------------------------------


class RuleOptimizer(torch.optim.Optimizer):
    """``rule`` as a ``torch.optim.Optimizer``: ``step()`` moves every parameter by the rule's update.

    A parameter without a gradient gets a zero one (so Adam's moments stay aligned with the list).

    >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
    >>> opt = RuleOptimizer([w], gd(0.5))
    >>> (0.5 * (w**2).sum()).backward(); opt.step(); w.tolist()
    [0.5, -1.0]
    """

    def __init__(self, params, rule: UpdateRule):
        super().__init__(params, {})
        self.rule = rule
        self.rule_state = rule.init([p.detach() for p in self._params()])

    def _params(self) -> Tensors:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self) -> None:
        params = self._params()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        updates, self.rule_state = self.rule.update(grads, self.rule_state)
        for p, u in zip(params, updates):
            p.add_(u)

    def state_dict(self) -> dict:
        return {"rule_state": self.rule_state}

    def load_state_dict(self, state_dict: dict) -> None:
        """The rule's state from :meth:`state_dict`, moved to the parameters' device (a checkpoint loads on the CPU)."""
        self.rule_state = _to_device(state_dict["rule_state"], self._params()[0].device)

    def __repr__(self) -> str:
        return f"RuleOptimizer({self.rule.name})"


def _to_device(state, device):
    if torch.is_tensor(state):
        return state.to(device)
    if isinstance(state, (list, tuple)):
        return type(state)(_to_device(s, device) for s in state)
    return state


class _Tensors(torch.nn.Module):
    """Plain tensors as a module's buffers, so that ``train`` can move, save and restore them in place."""

    def __init__(self, tensors: Tensors):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(f"t{i}", t)


@dataclass(frozen=True)
class _Objective:
    """A task whose every batch is empty and whose loss is ``loss_fn()``: a full-batch loss of closed-over tensors."""

    loss_fn: Callable[[], Tensor]

    def sample(self, batch_size: int, gen: torch.Generator | None = None, device=None) -> None:
        return None

    def loss(self, model, batch) -> Tensor:
        return self.loss_fn()


def minimize(loss_fn: Callable[[], Tensor], params: Tensors, rule: UpdateRule, steps: int, callback=None) -> History:
    """Take ``steps`` steps of ``rule`` on ``loss_fn()`` (a full-batch loss of ``params``), in place.

    ``params`` are leaf tensors with ``requires_grad``. Every step is logged in the returned history
    (``losses[k]`` is the loss *before* step ``k``), and ``callback(step, loss)`` is called after
    each step. This is :func:`icl_course.training.train` with a :class:`RuleOptimizer`, so it
    raises :class:`~icl_course.training.TrainingDiverged` if the loss stops being finite.
    """
    config = TrainConfig(steps=steps, batch_size=1, grad_clip=None, log_every=1)
    optimizer = RuleOptimizer(params, rule)
    return train(_Tensors(params), _Objective(loss_fn), config, callback, device=params[0].device, optimizer=optimizer)
