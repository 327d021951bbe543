"""Chapter 7: how the outer optimizer (sign descent, Adam) shapes what a transformer learns.

``signal_noise``: the signal-plus-noise data and the two-layer softmax-attention classifier.

``optimizers``: GD, sign descent and Adam as small update rules.

``in_context``: chapter 1's linear self-attention layer trained with each of them as the outer optimizer.
"""
