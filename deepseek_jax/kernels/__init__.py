"""Pure array operations: FP8 quantisation and matmuls, the grouped GEMMs of the routed experts, backend
detection. No Flax module, no mesh, no variable-tree path."""
