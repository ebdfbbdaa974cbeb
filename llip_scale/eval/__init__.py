"""Evaluation: zero-shot classification and retrieval, and benchmark sets in their native layouts
(``datasets`` reads them, ``suite`` runs a model over them)."""
