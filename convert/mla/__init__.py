"""GQA -> MLA (DeepseekV3 layout): the plan and the low-rank latent fit with decoupled RoPE."""
