"""Engine GPU destinations: ``register_cuda_tensor`` / ``retrieve(into=...)`` write the retrieved
K/V rows straight into a torch CUDA tensor of this (the engine's) process, through CUDA IPC and
the daemon's cuda transfer backend.

Without a GPU the daemon runs the host backend: registration is refused with a message saying
why, and bad handles are refused by name; those tests run everywhere. The GPU test is skipped
without torch + CUDA, saying so, unless ``KVDEX_REQUIRE_CUDA=1`` (scripts/gpu-check.sh), where
that is a failure.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import kvdex

H, KV, D, N = 4, 2, 64, 700
SINKS, WINDOW = 4, 16


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    k = rng.standard_normal((KV, N, D)).astype(np.float16)
    v = rng.standard_normal((KV, N, D)).astype(np.float16)
    q = rng.standard_normal((H, D)).astype(np.float32)
    return k, v, q


def cuda_torch():
    """torch with a usable CUDA device, or None (a skip, or a failure if CUDA is required)."""
    why = None
    try:
        import torch  # noqa: PLC0415 (optional dependency)

        if not torch.cuda.is_available():
            why = "torch sees no CUDA device"
    except ImportError:
        why = "torch is not installed"
    if why is None:
        return torch
    if os.environ.get("KVDEX_REQUIRE_CUDA") == "1":
        pytest.fail(f"KVDEX_REQUIRE_CUDA=1 but {why}")
    pytest.skip(why)


def test_bad_destinations_are_refused_by_name(daemon, data) -> None:
    k, v, q = data
    with kvdex.connect(daemon.url).create_session(1, H, KV, D, dtype="f16", sinks=SINKS, window=WINDOW) as s:
        s.append(0, k, v)
        with pytest.raises(kvdex.BadRequestError, match="64"):
            s.register_cuda_dest(b"\0" * 10, 0, 4096)
        with pytest.raises(kvdex.NotFoundError, match="engine destination 7"):
            s.retrieve(0, q, 8, gather=True, into=(7, 0))
        with pytest.raises(kvdex.BadRequestError, match="needs GATHER|need gather"):
            s.retrieve(0, q, 8, into=(0, 0))
        with pytest.raises(kvdex.NotFoundError, match="engine destination 3"):
            s.unregister_dest(3)
        # A zeroed IPC handle: the host backend says it has no CUDA; the cuda one, bad handle.
        with pytest.raises(kvdex.BadRequestError, match="cuda transfer backend|cuIpcOpenMemHandle"):
            s.register_cuda_dest(b"\0" * 64, 0, 4096)
        # The session still serves.
        assert s.retrieve(0, q, 8, gather=True).rows.shape == (H, 2, 8, D)


def test_rows_land_in_a_torch_cuda_tensor(daemon, data) -> None:
    torch = cuda_torch()
    k, v, q = data
    with kvdex.connect(daemon.url).create_session(1, H, KV, D, dtype="f16", sinks=SINKS, window=WINDOW) as s:
        s.append(0, k, v)
        want = s.retrieve(0, q, 32, gather=True)
        # A slice of a bigger tensor: the IPC handle names the allocator's block, and the
        # registration carries the offset of this view in it.
        big = torch.full((2, H, 2, 32, D), -7.0, dtype=torch.float16, device="cuda")
        dest = big[1]
        event = torch.cuda.Event(interprocess=True)
        handle = s.register_cuda_tensor(dest, event)
        got = s.retrieve(0, q, 32, gather=True, into=(handle, 0))
        assert got.rows is None and got.stride == 32
        np.testing.assert_array_equal(got.ids, want.ids)
        torch.cuda.current_stream().wait_event(event)
        np.testing.assert_array_equal(dest.cpu().numpy(), want.rows)
        assert (big[0] == -7.0).all(), "wrote outside the registered view"
        # An offset into the destination, and one past its end.
        half = H * 2 * 32 * D * 2 // 2
        with pytest.raises(kvdex.BadRequestError, match="engine destination"):
            s.retrieve(0, q, 32, gather=True, into=(handle, half))
        assert s.unregister_dest(handle) == 0
        with pytest.raises(kvdex.NotFoundError):
            s.retrieve(0, q, 32, gather=True, into=(handle, 0))
        # Registrations still held end with the session.
        s.register_cuda_tensor(big[0])
    assert (big[0] == -7.0).all()


def test_a_registered_tensor_returns_to_the_torch_cache_when_freed(daemon, data) -> None:
    """The IPC handle comes from the CUDA driver, not PyTorch's ``_share_cuda_`` (whose consumer
    count nothing decrements): once unregistered and freed, the block is PyTorch's again."""
    torch = cuda_torch()
    k, v, q = data
    with kvdex.connect(daemon.url).create_session(1, H, KV, D, dtype="f16", sinks=SINKS, window=WINDOW) as s:
        s.append(0, k, v)
        want = s.retrieve(0, q, 32, gather=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        buf = torch.zeros((H, 2, 32, D), dtype=torch.float16, device="cuda")
        handle = s.register_cuda_tensor(buf)
        s.retrieve(0, q, 32, gather=True, into=(handle, 0))
        np.testing.assert_array_equal(buf.cpu().numpy(), want.rows)
        assert s.unregister_dest(handle) == 0
        del buf
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before, "the registered block was kept"
