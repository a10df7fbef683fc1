"""What the stage kinds (`farm.stages`) train with: their context and the HF trainer's arguments
(`base`), progress and fault callbacks, checkpoints, checkpoint selection, the LM head's CPU
kernel and the training prompts' diversity."""
