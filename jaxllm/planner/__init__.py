"""Planning a run before it starts: per-device memory (`plan`) and ahead-of-time compilation for
TPU topologies (`aot`). Above training and inference: it builds their real programs."""
