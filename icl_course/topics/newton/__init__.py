"""Chapter 4: transformers can emulate Newton's method.

``matrix_inverse``: Newton-Schulz for a matrix inverse and for least squares, and the attention layers
that run it.

``logistic``: logistic regression in context (IRLS, GD, a transformer with MLPs).
"""
