"""Model folders: their layout, Hugging Face resolution, downloads and tiny random weights."""
