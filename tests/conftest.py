"""Shared test set-up. Under pytest-xdist each worker gets one core: one torch thread each."""

import os

import pytest
import torch


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture
def float64():
    """Run a test in float64 (restores the default afterwards)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _caption_checked(item):
    """Wrap a chapter cell's nbval run: a cell that shows a figure must carry a caption for the book."""
    run = item.runtest

    def runtest():
        run()
        images = [o for o in item.test_outputs or [] if "image/png" in o.get("data", {})]
        figure = item.cell.metadata.get("mystnb", {}).get("figure", {})
        if images and not figure.get("caption"):
            raise AssertionError(
                f"cell {item.cell_num} of {item.fspath.basename} shows a figure without a caption: give it "
                'cell metadata {"mystnb": {"figure": {"caption": "...", "name": "fig-..."}}}'
            )
        if len(images) > 1 and figure:
            raise AssertionError(
                f"cell {item.cell_num} of {item.fspath.basename} shows {len(images)} figures: the book "
                "attaches one caption to one image, so split the cell"
            )

    item.runtest = runtest


def pytest_collection_modifyitems(config, items):
    """Chapters' figures are checked for captions while nbval runs them (make test runs tests/ and
    chapters/ together, so this hook sees the notebook cells)."""
    for item in items:
        if type(item).__name__ == "IPyNbCell" and item.fspath.dirpath().basename == "chapters":
            _caption_checked(item)
