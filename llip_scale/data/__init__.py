"""Data: webdataset shards, the resumable stream, transforms, tokenizer."""
