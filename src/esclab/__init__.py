"""esclab: a reproducible environmental sound classification pipeline on ESC-50."""
