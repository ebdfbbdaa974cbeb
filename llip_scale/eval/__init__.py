"""Evaluation: zero-shot classification and retrieval; benchmark sets in their native layouts (``datasets``, ``suite``)."""
