"""Chapter 1: one linear-attention layer is one step of gradient descent.

The models and solvers are the core's (``linear_transformer``, ``solvers``); this folder holds the
experiment, its two extensions (``recurrent``: weight-tied LSA against multi-step GD and GD++;
``softmax``: one softmax-attention layer against one GD step) and the exercises' checks.
"""
