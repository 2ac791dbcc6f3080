"""Building blocks of the models: sparse voxel tensors, attention, transformer blocks."""
