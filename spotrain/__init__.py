"""spotrain: train one model on spot VMs across clouds, within a hard budget."""

__version__ = "0.1.0"
