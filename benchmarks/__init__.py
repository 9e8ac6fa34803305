"""fastdl's benchmarks: pytest-benchmark files per op (CPU or GPU) and the GPU runner
(``python -m benchmarks.run``). See benchmarks/README.md."""
