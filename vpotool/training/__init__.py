"""Trainers (Diffusion-DPO, ReFL, SCST) and what they share: LoRA adapters, checkpoints, metrics."""
