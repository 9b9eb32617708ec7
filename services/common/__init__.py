"""What every service shares: tensor codec, errors, metrics, server bootstrap, model loading."""
