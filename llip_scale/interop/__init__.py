"""Interoperability: the official Llip checkpoints (``official``), CLIP's BPE and SentencePiece
tokenizers (``tokenizers``), exported weights (``pretrained``), and the open_clip-style
``create_model_and_transforms`` / ``get_tokenizer`` (``factory``)."""
