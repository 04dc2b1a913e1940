"""Data stages: download, split, features, and the synthetic ESC-50 look-alike."""
