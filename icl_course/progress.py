"""Progress bars for the callers of the quiet library: notebooks and the command line.

``tqdm.auto`` draws a widget in a notebook and a text bar in a terminal.

>>> from icl_course.training import TrainConfig, train          # doctest: +SKIP
>>> train(model, task, cfg, callback=ProgressBar(cfg.steps))     # doctest: +SKIP
"""

from __future__ import annotations

from tqdm.auto import tqdm

__all__ = ["ProgressBar"]


class ProgressBar:
    """A ``callback(step, loss)`` that advances a bar and shows the latest loss; closes at the end."""

    def __init__(self, total: int, desc: str = "training", every: int = 25):
        self.total, self.every = total, every
        self.bar = tqdm(total=total, desc=desc, leave=True, mininterval=0.5)

    def __call__(self, step: int, loss: float) -> None:
        self.bar.update(1)
        if step % self.every == 0:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step + 1 >= self.total:
            self.bar.close()
