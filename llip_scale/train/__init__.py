"""Training: the loop (``loop``), one step in micro-batches (``step``), the DeepSpeed engine
(``engine``), once-per-node set-up (``node``), metrics and progress (``metrics``).

``llip-train`` and ``python -m llip_scale.train`` run :func:`llip_scale.train.loop.cli`.
Nothing is imported here. Checkpoints are :mod:`llip_scale.checkpoints`; ranks, gathers and stop
signals are :mod:`llip_scale.dist`.
"""
