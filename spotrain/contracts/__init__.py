"""The contracts between the control plane and the agents: the only part of `spotrain/` that
`spotrain.agents`, `spotrain.kernels` and the checkpoint stores may import (tests/test_layers.py
enforces it). Everything here is plain data and pure functions: no clock, cloud or database.
"""
