"""Classifiers and generative models."""

from avalanche_d2l.models.classifiers import ResNetCifar, SmallCNN, resnet18_cifar, small_cnn

__all__ = ["ResNetCifar", "SmallCNN", "resnet18_cifar", "small_cnn"]
