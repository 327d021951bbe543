"""Chapter 3: on noisy data linear transformers discover momentum and noise-adaptive rescaling.

``ridge``: the ridge baselines of the paper's Table 1.

``discovered_algorithm``: the algorithm a trained DIAG model runs, written out on (X, y).
"""
