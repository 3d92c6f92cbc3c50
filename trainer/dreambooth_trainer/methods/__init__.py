"""Training methods: what of the model trains, what a checkpoint holds, what is exported.

Today one method, `full`: full fine-tuning of the UNet (and of the text encoder, with
trainTextEncoder). LoRA adds its own beside it. A method works on any model family's components
(`dreambooth_trainer.models`): LoRA on SDXL is the two combined, not a third code path.
"""
