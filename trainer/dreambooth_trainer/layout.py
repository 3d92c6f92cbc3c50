"""Where the phases put their files inside the output location (storage.outputUri).

Names only, no imports: the export and the local runner need them without loading the trainer.
(checkpoint_manager.CHECKPOINTS_DIR and export.EXPORT_DIR are the others.)
"""

TRAINED_DIR = "trained"  # the trained weights the export phase starts from
SAMPLES_DIR = "samples"  # sample grids rendered during training, and the final one
LOGS_DIR = "logs"  # TensorBoard event files
