"""Chapter 5: test-time-training layers make the inner loop explicit.

``layers``: TTT layers (primal and dual form) and the mixers they are compared with: linear and
softmax attention, the delta rule, Nadaraya-Watson.

``models``: causal sequence models with a swappable token mixer.

``task``: in-context regression as a token sequence.
"""
