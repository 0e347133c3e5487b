"""Which heads to train: scores from weights (ALPS), from gradients, from a probe fine-tune, and the selection
of the best ones."""
