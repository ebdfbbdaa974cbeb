"""Checkpoints: layout, markers and checksums, verification, the newest complete one, resume,
resharding to another world size, consolidation and export (``store``, ``reshard``,
``deepspeed_io``, ``ds_compat``).

Imports no training code: the engine is passed in, and DeepSpeed's file layouts and the private
attributes we read live in :mod:`llip_scale.checkpoints.ds_compat`. Nothing is imported here.
"""
