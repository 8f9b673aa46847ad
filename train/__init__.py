"""``fruit-train``: learn a torchvision ResNet on an image folder and export TorchScript."""
