"""Probes: capture hooks, tokenizers and probe inputs (see fidelity.probes.capture, .tasks)."""
