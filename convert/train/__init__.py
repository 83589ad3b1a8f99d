"""Uptraining: recipes, the accelerate-driven distillation loop, data streams, kernel choice."""
