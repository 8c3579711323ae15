"""CIFAR-10 data: the conversion to FFCV .beton files (cifar10) and the training loaders (loaders)."""
