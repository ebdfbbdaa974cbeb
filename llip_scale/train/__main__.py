"""``python -m llip_scale.train CONFIG [overrides]``: the same as ``llip-train``."""
import sys

from llip_scale.dist.signals import record_early

# Before torch and DeepSpeed load (seconds): a stop signal during start-up is kept for the run.
record_early()

from llip_scale.train.loop import cli  # noqa: E402

sys.exit(cli())
