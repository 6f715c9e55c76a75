"""The training loop, its callbacks, metric writers, preemption and multi-process start-up."""
