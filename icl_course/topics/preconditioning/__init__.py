"""Chapter 2: deeper linear transformers run preconditioned gradient descent.

``preconditioners``: the optimal one-layer preconditioner, its closed-form loss and the preconditioner a
layer applies.
"""
