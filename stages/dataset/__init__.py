"""Getting pictures in: verified downloads, safe archive listing, the canonical images.zip, the CIFAR-10 python
format, image decoding and batched augmentation."""
