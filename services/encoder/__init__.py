"""The text-encoder stage: tokenizers + text encoders -> prompt embeddings."""
