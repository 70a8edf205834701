"""Training: the seed article's MNIST experiment, on embedded or user-provided digits."""
