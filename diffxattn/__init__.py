"""diffxattn: text-to-image diffusion with cross-attention you can see and edit."""
