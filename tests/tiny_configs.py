"""Pieces of the tiny federation configs that the end-to-end tests write as TOML files."""

# Tiny synthetic images: 24 train / 8 val / 16 test, a few large objects each.
SYNTHETIC_TOML = """[data.synthetic]
seed = 3
num_train = 24
num_val = 8
num_test = 16
min_objects = 3
max_objects = 5
min_object_size = 24
"""
