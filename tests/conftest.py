import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False)
settings.load_profile("ci")
torch.set_num_threads(min(2, os.cpu_count() or 1))
