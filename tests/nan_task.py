"""The example task, except that every third loss has finite value but NaN gradients.

d sqrt(u)/du is infinite at u = 0 and du/dp is 0 there, so adding sqrt(0 * p.sum()) leaves the
loss as it is and turns p's gradient into NaN: what an overflow in a backward pass looks like.
"""

from spotrain.contracts.task import SimpleTask
from spotrain.examples import tiny_gpt

_calls = 0


def loss(model, batch):
    global _calls
    _calls += 1
    value = tiny_gpt.loss(model, batch)
    if _calls % 3 == 0:
        value = value + (0.0 * next(model.parameters()).sum()).sqrt()
    return value


task = SimpleTask(build_model=tiny_gpt.build_model, batches=tiny_gpt.batches, loss=loss,
                  make_optimizer=tiny_gpt.make_optimizer)
