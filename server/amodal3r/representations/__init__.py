"""What the decoders produce: triangle meshes (FlexiCubes) and 3D Gaussians."""
