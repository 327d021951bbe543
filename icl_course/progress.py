"""Progress bars for the callers of the quiet library: notebooks and the command line.

``tqdm.auto`` draws a widget in a notebook and a text bar in a terminal.

>>> from icl_course.training import TrainConfig, train          # doctest: +SKIP
>>> train(model, task, cfg, progress="training LSA")              # doctest: +SKIP

``train(..., progress=...)`` makes one bar per run. A bar over several runs is made here and passed
as their callback: it counts the steps it is shown, so it also serves runs one after the other.

>>> bar = ProgressBar(3 * cfg.steps, desc="three runs")          # doctest: +SKIP
>>> for model in models: train(model, task, cfg, callback=bar)   # doctest: +SKIP
"""

from __future__ import annotations

from tqdm.auto import tqdm

__all__ = ["ProgressBar"]


class ProgressBar:
    """A ``callback(step, loss)`` that advances a bar by one and shows the latest loss; closes after ``total`` steps."""

    def __init__(self, total: int, desc: str = "training", every: int = 25):
        self.total, self.every, self.done = total, every, 0  # done: the steps shown so far
        self.bar = tqdm(total=total, desc=desc, leave=True, mininterval=0.5)

    def __call__(self, step: int, loss: float) -> None:
        if self.done % self.every == 0:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.skip(1)

    def skip(self, steps: int) -> None:
        """Advance over ``steps`` steps (a resumed run's steps before its checkpoint)."""
        self.done += steps
        self.bar.update(steps)
        if self.done >= self.total:
            self.bar.close()
