"""The network: built (nets), optimized (optim), selected (selection), scored (scores), saved (checkpoint, tensors)
and served on ONNX Runtime (deploy, which imports no torch)."""
