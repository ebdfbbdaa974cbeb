"""Scale arithmetic: the ZeRO memory planner (``planning``) and FLOPs per sample / MFU (``flops``).
Tables and reports built on them live in ``tools/``."""
