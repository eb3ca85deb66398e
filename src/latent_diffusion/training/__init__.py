"""Training: data, the two stages (the autoencoder, the diffusion U-Net), their shared pieces, evaluation."""
