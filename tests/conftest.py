import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # `from tiny import ...`

# Tiny fp32 models run fastest single-threaded (thread start-up dominates); tests that load real
# models raise this again through the `real_threads` fixture.
torch.set_num_threads(1)
