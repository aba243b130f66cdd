"""Released checkpoints into diffjax: safe readers of PyTorch weight files (``torch_file``).

Nothing here imports torch. Importing this package has no side effects.
"""
