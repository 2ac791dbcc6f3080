"""The Amodal3R pipeline over the models, its sampler, conditioning, click-to-mask and devices."""
