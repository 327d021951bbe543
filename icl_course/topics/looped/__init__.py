"""Chapter 6: looped transformers generalize to longer inputs by running more loops.

``tasks``: parity, copy and addition with their step counts T(n).

``models``: the looped transformer, its baselines, objectives, stopping rules and the clock.
"""
