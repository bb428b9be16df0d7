"""The update-safety model's parts; tests/model.py is its face (what it is, what it exports)."""
