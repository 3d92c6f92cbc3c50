"""The DreamBooth trainer: priors, training, checkpoints, export and serving."""
