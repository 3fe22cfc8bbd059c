"""Shared test set-up: CPU only, never the network, caches in a temporary folder."""

from __future__ import annotations

import os

# Before torch / open_clip / huggingface_hub are imported by any test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep every robustft cache (zero-shot heads, worlds, CAMs) out of the user's home."""
    if "ROBUSTFT_TEST_CACHE" in os.environ:  # a persistent cache, to speed up local reruns
        os.environ["ROBUSTFT_CACHE"] = os.environ["ROBUSTFT_TEST_CACHE"]
    else:
        os.environ["ROBUSTFT_CACHE"] = str(tmp_path_factory.mktemp("robustft-cache"))


# Tiny models are overhead-bound: one thread is as fast and keeps a 2-core machine usable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
