"""The runtime layer below data and training: stop signals (``signals``).

Nothing heavy is imported here: a task's first code imports :mod:`llip_scale.dist.signals`
before torch, so that a scheduler's stop signal never finds the default action.
"""
