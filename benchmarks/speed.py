"""How fast the package trains, measured side by side in one process: ``python benchmarks/speed.py``.

For each chapter's main training configuration (its ``quick`` profile's model, task and batch) it
reports

- ``steps/s`` of :func:`icl_course.train` (the real loop: sampling on the device, AdamW, clipping),
- ``sampling``: the share of a step spent drawing its batch (``task.sample`` timed alone, over the
  time of a whole step),
- ``before``: the same two numbers for the package as it was before sampling moved to the device:
  Gaussian draws in float64 rounded to float32 (:func:`icl_course.tasks.float64_draws`, the old
  stream exactly), uniform ones drawn in [0, 1) and scaled, and the layer's 4-operand einsum
  (:func:`einsum_forward`),
- for the linear-attention chapters, ``steps/s`` with every layer computed the common way (scores
  times values, ``O(B n^2 D)`` a layer, :func:`naive_forward`), and the speed-up of the package's
  layer over it;

then the layer alone, forward only, at evaluation sizes (50k sequences): the package's contraction
order, the previous einsum and the naive layer. Every ratio compares runs made in the same process
one after the other; absolute numbers depend on the machine and its load. ``--markdown`` prints the
tables as the README quotes them; ``--steps`` and ``--only`` make a short run (the test suite runs one).

    PYTHONPATH=. python benchmarks/speed.py [--device cpu|cuda] [--threads 1] [--steps 60] [--only 01 02]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import types
from dataclasses import replace

import torch

import icl_course as icl
from icl_course.linear_transformer import LinearSelfAttention, LinearTransformer
from icl_course.runtime import generator, get_device
from icl_course.tasks import Uniform, float64_draws

# --- the layer three ways --------------------------------------------------------------------------


def naive_forward(self: LinearSelfAttention, Z: torch.Tensor) -> torch.Tensor:
    """The layer as usually written: scores ``(Z Q_h) C^T`` of every token with every context token,
    times the values ``C P_h^T``: ``O(B H n^2 D)``, against the package's ``O(B n D^2)``."""
    n = Z.shape[1] - 1
    C = Z[:, :n]  # (B, n, D)
    Q, P = self.matrices()  # (H, D, D)
    scores = torch.einsum("btd,hde,bje->bhtj", Z, Q, C) / n  # (B, H, n+1, n)
    values = torch.einsum("bje,hge->bhjg", C, P)  # (B, H, n, D)
    return Z + (scores @ values).sum(1)  # (B, n+1, D)


def einsum_forward(self: LinearSelfAttention, Z: torch.Tensor) -> torch.Tensor:
    """The package's layer before: the same ``S = C^T C / n``, then one 4-operand einsum (contracted
    left to right, which builds ``(B, H, n+1, D)`` intermediates)."""
    n = Z.shape[1] - 1
    C = Z[:, :n]
    Q, P = self.matrices()
    S = C.transpose(1, 2) @ C / n
    return Z + torch.einsum("btd,hde,bef,hgf->btg", Z, Q, S, P)


LAYERS = {"package": None, "einsum (before)": einsum_forward, "naive": naive_forward}


def with_layer(model: torch.nn.Module, forward) -> torch.nn.Module:
    """``model`` with every linear-attention layer computed by ``forward`` (None: the package's)."""
    for module in model.modules():
        if isinstance(module, LinearSelfAttention):
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = types.MethodType(forward, module)
    return model


# --- the chapters' main training configurations ------------------------------------------------------


def _gd_step():
    from icl_course.topics.gd_step import experiment as ex

    c = ex.CONFIGS["quick"]
    return (f"1 layer, d={c.d}, n={c.n_ctx}, U inputs", lambda: icl.linear_transformer(c.d, 1, 1, init_std=c.init_std),
            ex.make_task(c), c.train)


def _preconditioning():
    from icl_course.topics.preconditioning import experiment as ex

    c = ex.CONFIGS["quick"]
    return (f"3 layers, d={len(c.exponents)}, n={c.n_ctx}, N(0, Sigma) inputs",
            lambda: icl.linear_transformer(len(c.exponents), 3, c.n_heads, init_std=c.init_std), ex.make_task(c),
            c.train_deep)


def _preconditioning_issue():
    """The configuration the speed issue was measured at (chapter 2's full-profile shape, one head)."""
    from icl_course.topics.preconditioning import experiment as ex

    c = ex.CONFIGS["quick"]
    return ("3 layers, d=5, n=20, batch 4000 (the issue's)", lambda: icl.linear_transformer(5, 3, 1), ex.make_task(c),
            icl.TrainConfig(batch_size=4000, lr=1e-2))


def _mixed_noise():
    from icl_course.topics.mixed_noise import experiment as ex

    spec = ex.CONFIGS["quick"].live
    return (f"{spec.n_layers} {spec.attention} layers, d=10, n=20, noise {spec.setting}",
            lambda: icl.linear_transformer(10, spec.n_layers, attention=spec.attention, clamp=spec.clamp),
            ex.make_task(spec.setting), icl.TrainConfig(batch_size=spec.batch_size, lr=spec.lr))


def _newton():
    from icl_course.tasks import IllConditioned, RegressionTask
    from icl_course.topics.newton import experiment as ex

    c = ex.CONFIGS["quick"]
    task = RegressionTask(d=c.d, n_ctx=c.n_ctx, inputs=IllConditioned(c.d, c.kappa))
    return (f"{c.n_layers} layers x {c.n_heads} heads, d={c.d}, n={c.n_ctx}, ill-conditioned",
            lambda: icl.linear_transformer(c.d, c.n_layers, c.n_heads, "full", c.init_std, c.clamp), task, c.train)


def _ttt():
    from icl_course.topics.ttt import experiment as ex
    from icl_course.topics.ttt.task import SequenceRegressionTask

    c = ex.CONFIGS["quick"]
    return (f"ttt-linear, {c.n_layers} block, width {c.width}, {c.n_points} points",
            lambda: ex.make_model(c, "ttt-linear"), SequenceRegressionTask(c.d, c.n_points, c.noise), c.train)


def _looped():
    from icl_course.topics.looped import experiment as ex

    c = ex.CONFIGS["quick"]
    spec = c.task("parity")
    family = ex.FAMILIES["looped"]
    return (f"looped block, width {c.width}, parity", lambda: family.model(c, spec, 0), family.objective(c, spec),
            c.train_config(c.steps))


def _sign_descent():
    from icl_course.topics.sign_descent import in_context

    c = in_context.InContextConfig()
    return (f"1 layer, d={c.d}, n={c.n_ctx} (in-context part)", lambda: icl.linear_transformer(c.d, 1, 1, init_std=c.init_std),
            c.task(), icl.TrainConfig(steps=c.steps, batch_size=c.batch_size))


CASES = {"01_gd_step": _gd_step, "02_preconditioning": _preconditioning, "02_issue": _preconditioning_issue,
         "03_mixed_noise": _mixed_noise, "04_newton": _newton, "05_ttt": _ttt, "06_looped": _looped,
         "07_sign_descent": _sign_descent}


# --- measuring -------------------------------------------------------------------------------------------


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _uniform_before(self, shape, gen, dtype=torch.float32):
    """``Uniform.draw`` as it was: the same numbers, drawn in [0, 1) and scaled (twice the time)."""
    return self.low + (self.high - self.low) * torch.rand(shape, generator=gen, dtype=dtype, device=gen.device)


@contextlib.contextmanager
def _draws(before: bool):
    """Nothing, or (``before``) every draw made as before: Gaussians in float64, uniforms scaled."""
    if not before:
        yield
        return
    draw = Uniform.draw
    Uniform.draw = _uniform_before
    try:
        with float64_draws():
            yield
    finally:
        Uniform.draw = draw


def steps_per_second(make_model, task, config: icl.TrainConfig, steps: int, device, forward=None,
                     before: bool = False) -> float:
    """Steps a second of ``train`` over ``steps`` steps, after 3 steps of warm-up; ``before``: with the
    draws made as before (float64)."""
    with _draws(before):
        model = with_layer(make_model(), forward)
        config = replace(config, steps=3, log_every=1)
        icl.train(model, task, config, device=device)
        _sync(device)
        history = icl.train(with_layer(make_model(), forward), task, replace(config, steps=steps), device=device)
        _sync(device)
    return steps / history.seconds


def sampling_seconds(task, batch_size: int, draws: int, device, before: bool = False) -> float:
    """Seconds to draw one training batch on ``device`` (as ``train`` does), best of ``draws``."""
    gen = generator(0, device)
    best = float("inf")
    with _draws(before):
        for _ in range(draws + 1):
            start = time.perf_counter()
            task.sample(batch_size, gen, device=device)
            _sync(device)
            best = min(best, time.perf_counter() - start)
    return best


def measure_case(name: str, steps: int, device, repeats: int = 3) -> dict:
    """One case's numbers: now, before, and (linear attention) with the naive layer. The variants take
    turns, ``repeats`` times, and each keeps its best run (the one least slowed by other processes)."""
    label, make_model, task, config = CASES[name]()
    linear = isinstance(make_model(), LinearTransformer)
    draws = max(5, steps // 3)
    variants = {"now": (None, False), "before": (einsum_forward if linear else None, True),
                **({"naive": (naive_forward, False)} if linear else {})}
    best = dict.fromkeys(variants, 0.0)
    for _ in range(repeats):
        for key, (forward, old) in variants.items():
            best[key] = max(best[key], steps_per_second(make_model, task, config, steps, device, forward, before=old))
    rate, before = best["now"], best["before"]
    row = {"case": name, "config": label, "batch": config.batch_size, "steps_per_s": rate,
           "sampling_share": sampling_seconds(task, config.batch_size, draws, device) * rate,
           "steps_per_s_before": before,
           "sampling_share_before": sampling_seconds(task, config.batch_size, draws, device, before=True) * before}
    if linear:
        row["steps_per_s_naive"] = best["naive"]
        row["speedup_over_naive"] = rate / row["steps_per_s_naive"]
    return row


def layer_seconds(B: int, n: int, d: int, heads: int, device, repeats: int = 3) -> dict:
    """Forward time of one FULL layer on ``B`` sequences, each way (best of ``repeats``), and the speed-ups."""
    layer = icl.linear_transformer(d, 1, heads, init_std=0.1).layers[0].to(device)
    Z = torch.randn(B, n + 1, d + 1, generator=generator(0, device), device=device)
    out = {}
    with torch.no_grad():
        reference = None
        for name, forward in LAYERS.items():
            with_layer(layer, forward)
            best = float("inf")
            for _ in range(repeats + 1):
                _sync(device)
                start = time.perf_counter()
                result = layer(Z)
                _sync(device)
                best = min(best, time.perf_counter() - start)
            reference = result if reference is None else reference
            if not torch.allclose(result, reference, rtol=1e-3, atol=1e-4 * float(reference.abs().max())):
                raise AssertionError(f"the {name} layer disagrees with the package's")
            out[name] = best
    with_layer(layer, None)
    return {"B": B, "n": n, "d": d, "heads": heads, **{f"seconds_{k}": v for k, v in out.items()},
            "speedup_over_einsum": out["einsum (before)"] / out["package"], "speedup_over_naive": out["naive"] / out["package"]}


LAYER_SIZES = [(50_000, 20, 5, 1), (50_000, 20, 5, 4), (50_000, 20, 10, 1), (50_000, 40, 10, 2), (4000, 20, 5, 1)]


def markdown(rows: list[dict], layers: list[dict], meta: dict) -> str:
    lines = [f"Training, {meta['device']}, {meta['threads']} thread(s), best of {meta['repeats']} runs of "
             f"{meta['steps']} steps (`python benchmarks/speed.py`, {meta['date']}):", "",
             "| chapter | model and task | batch | steps/s | sampling share | steps/s before | sampling share before "
             "| steps/s, naive layer | speed-up over naive |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        naive = f"{r['steps_per_s_naive']:.1f}" if "steps_per_s_naive" in r else "-"
        speedup = f"{r['speedup_over_naive']:.1f}x" if "speedup_over_naive" in r else "-"
        lines.append(f"| {r['case']} | {r['config']} | {r['batch']} | {r['steps_per_s']:.1f} | {r['sampling_share']:.0%} "
                     f"| {r['steps_per_s_before']:.1f} | {r['sampling_share_before']:.0%} | {naive} | {speedup} |")
    if layers:
        lines += ["", "One layer, forward, evaluation sizes (seconds; best of 3):", "",
                  "| sequences | n | d | heads | package | 4-operand einsum (before) | naive | speed-up over einsum | over naive |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in layers:
            lines.append(f"| {r['B']} | {r['n']} | {r['d']} | {r['heads']} | {r['seconds_package']:.3f} | "
                         f"{r['seconds_einsum (before)']:.3f} | {r['seconds_naive']:.3f} | {r['speedup_over_einsum']:.1f}x | "
                         f"{r['speedup_over_naive']:.1f}x |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="default: CUDA when there is one, else the CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    parser.add_argument("--steps", type=int, default=60, help="training steps timed per run (default 60)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, the best kept (default 3)")
    parser.add_argument("--only", nargs="*", default=None, help="cases whose names start with these (e.g. 01 02)")
    parser.add_argument("--no-layers", action="store_true", help="skip the layer-alone timings")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error(f"--steps and --repeats must be >= 1, got {args.steps} and {args.repeats}")
    device = torch.device(args.device) if args.device else get_device()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    names = [n for n in CASES if args.only is None or any(n.startswith(p) for p in args.only)]
    if not names:
        parser.error(f"--only matches no case; cases: {list(CASES)}")
    rows = []
    for name in names:
        rows.append(measure_case(name, args.steps, device, args.repeats))
        print(json.dumps(rows[-1]), file=sys.stderr)
    layers = [] if args.no_layers else [layer_seconds(*size, device) for size in LAYER_SIZES]
    meta = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({device})",
            "threads": torch.get_num_threads(), "steps": args.steps, "repeats": args.repeats, "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__}
    result = {"meta": meta, "training": rows, "layer": layers}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(markdown(rows, layers, meta) if args.markdown else json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
