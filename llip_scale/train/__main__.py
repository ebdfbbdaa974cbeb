"""``python -m llip_scale.train CONFIG [overrides]``: the same as ``llip-train``."""
from llip_scale.dist.signals import record_early

# Before torch and DeepSpeed load (seconds): a stop signal during start-up is kept for the run.
record_early()

from llip_scale.dist.collectives import exit_without_teardown  # noqa: E402
from llip_scale.train.loop import cli  # noqa: E402

code = cli()
# The run is over and saved, its files closed and its process group destroyed.
exit_without_teardown(code if isinstance(code, int) else 1)
