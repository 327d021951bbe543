"""Chapter 1: one linear-attention layer is one step of gradient descent.

The models and solvers are the core's (``linear_transformer``, ``solvers``); this folder holds only
the experiment and the exercises' checks.
"""
