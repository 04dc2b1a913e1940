"""Using a trained model: the preprocessing it carries, loading the cross-validation's fold models, `esclab predict`."""
