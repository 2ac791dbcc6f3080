"""The environment variables this package and the Blender add-on read, named once."""

TOKEN = "AMODAL3R_TOKEN"  # the server's bearer token, given by the process that starts it
MODEL = "AMODAL3R_MODEL"  # a model folder or Hugging Face id overriding the default
SERVER_PYTHON = "AMODAL3R_SERVER_PYTHON"  # the Python that runs the server for the add-on
TORCH_INDEX_URL = "AMODAL3R_TORCH_INDEX_URL"  # the PyTorch wheel index Set up backend uses
ATTN_BACKEND = "AMODAL3R_ATTN_BACKEND"  # sdpa | xformers | flash_attn
SPARSE_CONV = "AMODAL3R_SPARSE_CONV"  # torch | spconv
SPCONV_ON_CPU = "AMODAL3R_SPCONV_ON_CPU"  # 1: let spconv take CPU tensors (backend comparison only)
HF_OFFLINE = "HF_HUB_OFFLINE"  # Hugging Face's own switch: no downloads
