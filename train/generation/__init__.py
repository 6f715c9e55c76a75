"""Text from saved models: sampling and chat (train.generate), back-translation (train.augment)."""
