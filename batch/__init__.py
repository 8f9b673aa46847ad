"""``fruit-batch``: score folder trees against TorchServe or locally."""
