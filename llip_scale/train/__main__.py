"""``python -m llip_scale.train CONFIG [overrides]``: the same as ``llip-train``."""
import sys

from llip_scale.train.loop import cli

sys.exit(cli())
