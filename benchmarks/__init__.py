"""Throughput benchmarks: our Dreamer update against TorchRL's library components and a plain-PyTorch baseline."""
