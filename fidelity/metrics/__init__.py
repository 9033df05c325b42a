"""Metrics computed from captured states and model passes (ETMF, ECLMF, decay, retrieval)."""
