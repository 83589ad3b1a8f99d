"""Publishing: the model card and pushes to the Hub."""
