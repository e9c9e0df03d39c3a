"""ppfr.pipelines: NVIDIA DALI input pipelines (DALI is optional and imported lazily inside functions)."""
