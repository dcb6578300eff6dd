"""Input pipeline: LLaVA conversation data, images, tokenization, grain and TFDS."""
