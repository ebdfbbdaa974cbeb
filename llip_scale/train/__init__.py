"""Training: the loop (``loop``), the DeepSpeed engine (``engine``, the one module that knows
DeepSpeed), checkpoints (``checkpoint``: save, verify, find the newest complete one, retention),
ranks, gathers and the preemption flag (``distributed``), metrics and progress (``metrics``).

``llip-train`` and ``python -m llip_scale.train`` run :func:`llip_scale.train.loop.cli`.
Nothing is imported here, so ``llip_scale.train.distributed`` can be used (by the data loader's
workers) without loading DeepSpeed.
"""
