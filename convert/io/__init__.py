"""Reading sources and writing outputs: Hub/folder resolution, lazy checkpoints, the planned atomic writer, text data."""
