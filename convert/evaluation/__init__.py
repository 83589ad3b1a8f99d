"""Measuring fidelity: short-window perplexity/KL, long-context retrieval and perplexity by position, reports."""
