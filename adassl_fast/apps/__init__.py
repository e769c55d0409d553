"""The applications built on the loss library: the `adassl-fast` command (cli), the trainer (train), the
comparison job (compare), their data and metrics, and the benchmark harness (benchmark).

They sit above everything else (docs/architecture.md): nothing in the library imports them."""
