"""TorchServe handler for fruitserve and the preprocessing it shares with training and batch scoring."""
