"""Data for training tiny text-to-image models whose outputs can be checked without a learned judge."""
