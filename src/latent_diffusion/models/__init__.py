"""The model: U-Net, spatial transformer, attention, autoencoder (and tiling), text encoders, tokenizer, SDXL's
conditioner, configs and presets, the family table, and the whole `LatentDiffusion`. Imports nothing above it."""
