"""Model families: where a base model's architecture plugs into the trainer.

A family says how to load its base pipeline (`loading`), which components it has and how they
compute a prediction from latents and a prompt (`components`: the trainable module, the frozen
parts, the sampling pipeline), how its pipeline generates images from prompts (`generation`:
the priors phase, the inference server and validation samples all call it), which files it
exports besides the diffusers pipeline (`single_file`: the original checkpoint layout), and how
to build random test models of its architecture (`random_models`).

Two families: Stable Diffusion 1.x/2.x (UNet, one CLIP text encoder, VAE: `components`) and SDXL
(two text encoders acting as one, the pooled embedding and the size micro-conditioning: `sdxl`);
`components` picks between them from the pipeline (`family`). What trains of a family's
components is the training method's business (`dreambooth_trainer.methods`).
"""
