"""The layout of the flow models' condition, defined once.

One view is a 518x518 picture cut into 37x37 patches of 14 pixels. Its condition stacks, row by
row: the encoder's class token and 4 registers, the 1369 patch tokens (row-major), then the
visible-target fraction of each patch and the occluder fraction of each patch, each repeated over
all channels: ``[views, 4112, C]``.
"""

IMAGE_SIZE = 518  #: side of the square image the encoder sees
PATCH_SIZE = 14  #: ViT patch side in pixels
PATCH_GRID = IMAGE_SIZE // PATCH_SIZE  #: 37 patches per side
NUM_PATCHES = PATCH_GRID * PATCH_GRID  #: 1369
NUM_REGISTER_TOKENS = 4
NUM_PREFIX_TOKENS = 1 + NUM_REGISTER_TOKENS  #: class token + registers
NUM_IMAGE_TOKENS = NUM_PREFIX_TOKENS + NUM_PATCHES  #: 1374
NUM_COND_TOKENS = NUM_IMAGE_TOKENS + 2 * NUM_PATCHES  #: 4112
