"""Checks for the exercises of chapter 7 (sign descent, Adam, and noise memorisation)."""

from __future__ import annotations

import torch

from icl_course.checking import Wrong, check, expect, expect_close, expect_shape

from .optimizers import UpdateRule, adam, apply_updates, sign_descent
from .signal_noise import SignalNoiseTask, SoftmaxAttentionClassifier, value_noise

__all__ = ["sign_descent_rule", "adam_rule", "value_noise_per_sample"]


def _random_params(gen: torch.Generator) -> list[torch.Tensor]:
    """Two or three tensors of random shapes, float64."""
    shapes = [(int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(1, 6, (1,), generator=gen))) for _ in range(3)]
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes[: 2 + int(torch.randint(2, (1,), generator=gen))]]


def _rollout(rule, params, grads_per_step) -> list[list[torch.Tensor]]:
    """The updates ``rule`` returns for a fixed sequence of gradients (params are moved by them)."""
    expect(hasattr(rule, "init") and hasattr(rule, "update"), "Return an `UpdateRule(init, update)`.")
    state = rule.init([p.clone() for p in params])
    out = []
    for grads in grads_per_step:
        result = rule.update([g.clone() for g in grads], state)
        expect(isinstance(result, tuple) and len(result) == 2, "`update` must return a pair `(updates, state)`.")
        updates, state = result
        expect(isinstance(updates, (list, tuple)) and len(updates) == len(grads), f"`update` must return one update per tensor ({len(grads)} here).")
        for k, (u, g) in enumerate(zip(updates, grads)):
            expect_shape(f"updates[{k}]", u, tuple(g.shape))
        out.append([u.detach().to(torch.float64) for u in updates])
        params = apply_updates(params, out[-1])
    return out


def _same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]], atol: float = 1e-10) -> bool:
    return all(torch.allclose(x, y, rtol=1e-7, atol=atol) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


@check("Exercise 1: sign descent as an update rule")
def sign_descent_rule(student_fn, gen):
    lr = float(torch.empty(1).uniform_(0.01, 0.5, generator=gen))
    params = _random_params(gen)
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) * 10.0 ** float(torch.randint(-4, 3, (1,), generator=gen)) for p in params] for _ in range(3)]
    grads[1][0].view(-1)[0] = 0.0  # a zero gradient: sign(0) = 0, the weight must not move
    got = _rollout(student_fn(lr), params, grads)
    want = _rollout(sign_descent(lr), params, grads)
    if _same(got, [[-u for u in us] for us in want]):
        raise Wrong("Your updates point uphill: the update is -lr * sign(g), with a minus sign.")
    if _same(got, [[-lr * g for g in gs] for gs in grads]):
        raise Wrong("That is gradient descent: the update uses sign(g), not g itself.")
    if _same(got, [[u / lr for u in us] for us in want]):
        raise Wrong("The direction is right but every update has size 1: multiply by the learning rate.")
    if got[1][0].view(-1)[0] != 0:
        raise Wrong("Where the gradient is exactly 0, sign descent leaves the weight alone (torch.sign(0) = 0).")
    expect(_same(got, want), "Your updates differ from -lr * sign(g); check each step against that formula.")


def _adam_without_bias_correction(lr, b1, b2, eps):
    def init(params):
        return [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]

    def update(grads, state):
        ms = [b1 * m + (1 - b1) * g for m, g in zip(state[0], grads)]
        vs = [b2 * v + (1 - b2) * g * g for v, g in zip(state[1], grads)]
        return [-lr * m / (v.sqrt() + eps) for m, v in zip(ms, vs)], (ms, vs)

    return UpdateRule(init, update)


@check("Exercise 2: Adam, and Adam without memory")
def adam_rule(student_fn, gen):
    lr = float(torch.empty(1).uniform_(0.01, 0.5, generator=gen))
    b1 = float(torch.empty(1).uniform_(0.5, 0.95, generator=gen))
    b2 = float(torch.empty(1).uniform_(0.9, 0.999, generator=gen))
    eps = 1e-8
    params = _random_params(gen)
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params] for _ in range(5)]
    got = _rollout(student_fn(lr, b1, b2, eps), params, grads)
    want = _rollout(adam(lr, b1, b2, eps), params, grads)
    if _same(got, [[-u for u in us] for us in want]):
        raise Wrong("Your updates point uphill: Adam's update is -lr * m_hat / (sqrt(v_hat) + eps).")
    if _same(got, _rollout(_adam_without_bias_correction(lr, b1, b2, eps), params, grads)):
        raise Wrong("Almost: divide m by (1 - b1^t) and v by (1 - b2^t) (the bias corrections, t counting from 1).")
    if _same(got[:1], want[:1]) and not _same(got, want):
        raise Wrong("Your first step is right but later ones are not: does the state carry m, v and the step count t?")
    expect(_same(got, want, atol=1e-9), "Your updates differ from Adam's; compare one step by hand with the formula.")
    # Without memory (b1 = b2 = 0) the same rule must be sign descent, up to eps.
    got0 = _rollout(student_fn(lr, 0.0, 0.0, 0.0), params, grads)
    sign = _rollout(sign_descent(lr), params, grads)
    expect(_same(got0, sign), "With b1 = b2 = 0 and eps = 0 your rule should give -lr * sign(g) exactly.")


@check("Exercise 3: noise memorisation, sample by sample")
def value_noise_per_sample(student_fn, gen):
    d = int(torch.randint(20, 60, (1,), generator=gen))
    n = int(torch.randint(3, 9, (1,), generator=gen))
    task = SignalNoiseTask(d=d, snr=float(torch.empty(1).uniform_(0.2, 2.0, generator=gen)), sparsity=5)
    for _ in range(100):  # both labels present, so that forgetting y_i shows
        batch = task.sample(n, gen, dtype=torch.float64)
        if (batch.y > 0).any() and (batch.y < 0).any():
            break
    seed = int(torch.randint(2**31, (1,), generator=gen))
    model = SoftmaxAttentionClassifier(d, width=int(torch.randint(2, 5, (1,), generator=gen)), init_std=1.0, seed=seed).double()
    got = student_fn(model, batch)
    expect(torch.is_tensor(got), f"Return a tensor, got {type(got).__name__}.")
    expect(got.numel() != 1 or n == 1, "Return one number per sample (shape (n,)), not the mean over samples.")
    want = value_noise(model, batch)
    expect_shape("value_noise", got, tuple(want.shape))
    got = got.detach().to(torch.float64)
    w = model.W_V.detach().mean(dim=1)  # (2, d)
    unsigned_label = ((w[0] - w[1]) @ batch.xi.T) / 2  # forgot y_i
    no_j = ((w[0] + w[1]) @ (batch.y[:, None] * batch.xi).T) / 2  # forgot the output sign j
    first_r = ((model.W_V[0, 0] - model.W_V[1, 0]).detach() @ (batch.y[:, None] * batch.xi).T) / 2  # r = 0 only
    for wrong, message in (
        (-want, "The sign is flipped: the value half j = -1 pushes f down, so count it with a minus sign."),
        (unsigned_label, "Multiply each noise patch by its label: the inner product is with y_i xi_i."),
        (no_j, "The two value halves push f in opposite directions: weight half j by j = +1 or -1."),
        (first_r, "Average over all m_v value rows r, not just the first."),
    ):
        if torch.allclose(got, wrong, rtol=1e-6, atol=1e-9) and not torch.allclose(got, want, rtol=1e-6, atol=1e-9):
            raise Wrong(message)
    expect_close("value_noise", got, want, rtol=1e-6, atol=1e-9)
