"""llip_scale: pretraining Llip vision-language models at scale."""
__version__ = "0.1.0"
