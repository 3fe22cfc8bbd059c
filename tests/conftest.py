"""Shared test set-up: CPU only, never the network, caches in a temporary folder.

GPUs are hidden from every test, except when the run selects the ``gpu`` marker
(``pytest -m gpu``) or sets ``ROBUSTFT_TEST_GPU=1``: the tests in ``tests/test_gpu.py``
then see the machine's CUDA devices (and skip, with the reason, where there are none).
"""

from __future__ import annotations

import os

# Before torch / open_clip / huggingface_hub are imported by any test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _gpu_tests_selected(markexpr: str) -> bool:
    """Whether the ``-m`` expression selects a test marked ``gpu`` (and nothing else)."""
    if os.environ.get("ROBUSTFT_TEST_GPU") == "1":
        return True
    if "gpu" not in markexpr:
        return False
    try:  # pytest's own evaluator of -m expressions
        from _pytest.mark.expression import Expression

        return bool(Expression.compile(markexpr).evaluate(lambda name, **_: name == "gpu"))
    except Exception:  # another pytest: fall back to the plain spelling
        return markexpr.strip() == "gpu"


def pytest_configure(config: pytest.Config) -> None:
    # Before any test module is imported, and so before anything initialises CUDA.
    if not _gpu_tests_selected(config.option.markexpr or ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


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
