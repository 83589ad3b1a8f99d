"""Attention -> linear layers (Mamba2, Gated DeltaNet): the plan, the initialisation and attention transfer."""
