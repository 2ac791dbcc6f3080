"""Files in and out: user images and masks, GLB/PLY/PNG results, UV unwrapping."""
