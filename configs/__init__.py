"""Experiment configs: Python files whose `get_config(arg=None)` returns an
ml_collections.ConfigDict (`--config=configs/<name>.py[:arg]`)."""
