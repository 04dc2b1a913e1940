"""Training: the fold data module, the Lightning classifier and the cross-validation loop."""
