"""mqt: Matryoshka Query Transformer vision-language models in JAX/Flax (Linen)."""
