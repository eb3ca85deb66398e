"""Files in, models out: reading files safely, loading and saving models, LoRA-family merges, embeddings."""
