"""The Megatron backend: config translation and HF <-> megatron-core weights (pure, CPU-tested)
and the engine (megatron-core; CUDA only)."""
