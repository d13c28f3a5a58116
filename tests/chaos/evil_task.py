"""An admitted agent turned malicious: the example task, except that its gradients alternate
between NaN (with a finite loss) and a million times their size, and the agent's own check of
its gradients (`kernels.guards.gradients_finite`) is switched off, so they are sent.

It repairs its own parameters before each step (an attacker's own NaN would stop its steps and
end the attack), so it keeps poisoning every averaging round it joins.
"""

import torch

import spotrain.kernels.guards as guards
from spotrain.contracts.task import SimpleTask
from spotrain.examples import tiny_gpt

guards.gradients_finite = lambda parameters: True  # what a modified agent would do
_calls = 0


def loss(model, batch):
    global _calls
    _calls += 1
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.nan_to_num_(0.0, 0.0, 0.0).clamp_(-1.0, 1.0)
    value = tiny_gpt.loss(model, batch)
    if _calls % 2:
        return value + (0.0 * next(model.parameters()).sum()).sqrt()  # finite loss, NaN gradients
    return value * 1e6  # finite, a million times the gradients


task = SimpleTask(build_model=tiny_gpt.build_model, batches=tiny_gpt.batches, loss=loss,
                  make_optimizer=tiny_gpt.make_optimizer)
