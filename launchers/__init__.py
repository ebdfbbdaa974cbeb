"""Job launchers, installed as ``llip_scale.launchers``."""
