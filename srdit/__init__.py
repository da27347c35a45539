"""srdit: fast, exact training of SR-DiT (Speedrunning ImageNet Diffusion)."""
__version__ = "0.1.0"
