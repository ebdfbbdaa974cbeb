"""``python -m llip_scale.train CONFIG [overrides]``: the same as ``llip-train``."""
import atexit
import os
import sys

from llip_scale.dist.signals import record_early

# Before torch and DeepSpeed load (seconds): a stop signal during start-up is kept for the run.
record_early()

from llip_scale.train.loop import cli  # noqa: E402

code = cli()
# The run is over and saved, its files closed and its process group destroyed. Python's exit
# hooks still run (they end open loaders' workers), but not the interpreter's teardown, where
# a native thread of the communication stack left joinable can abort a finished rank
# ("terminate called without an active exception") and turn a complete run into a failed one.
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code if isinstance(code, int) else 1)
