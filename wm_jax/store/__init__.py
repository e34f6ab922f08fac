"""What is kept on disk below the models: datasets (data: collection, save, load, validation,
batching) and orbax checkpoints (checkpoint). They import only the ground modules."""
