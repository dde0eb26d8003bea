import os

# Without a GPU the Triton kernels run on the interpreter, which must be chosen before anything imports triton:
# collecting test_flex (FlexAttention, inductor) first left the later-decorated kernels unable to resolve tl.cdiv.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False)
settings.load_profile("ci")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is much faster than two on a busy 2-core CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def private_summary_cache(tmp_path_factory):
    """finetune's on-disk summary cache goes to a fresh directory, never the user's ~/.cache/topopack."""
    old = os.environ.get("TOPOPACK_CACHE")
    os.environ["TOPOPACK_CACHE"] = str(tmp_path_factory.mktemp("topopack-cache"))
    yield
    if old is None:
        os.environ.pop("TOPOPACK_CACHE", None)
    else:
        os.environ["TOPOPACK_CACHE"] = old
