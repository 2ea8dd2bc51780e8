"""Fixtures shared by every test package: real PEFT LoRA adapters on a tiny model, and the
session's own Redis (``tests/redis_db.py``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_db import session_redis
from worker.demo import make_tiny_adapters

#: Heterogeneous ranks and scalings: plain, rslora, and per-module rank/alpha patterns.
ADAPTER_SPECS = [
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    {"r": 8, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
    {
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "k_proj", "down_proj"],
        "rank_pattern": {"k_proj": 6},
        "alpha_pattern": {"layers.1.self_attn.q_proj": 16},
    },
]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of this session's Redis: a private ``redis-server`` (or the empty database
    ``COREMERGE_TEST_REDIS_URL`` names). Tests keep apart by key prefix and queue name."""
    with session_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def peft_adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three real PEFT adapters (saved by peft) on the tiny Llama of ``worker.demo``."""
    return make_tiny_adapters(tmp_path_factory.mktemp("adapters"), ADAPTER_SPECS)


@pytest.fixture
def adapter_copy(peft_adapters: list[Path], tmp_path: Path):
    """A fresh, editable copy of one of the adapters, for corrupting it in a test."""

    def copy(index: int = 0) -> Path:
        dst = tmp_path / f"copy-{index}"
        shutil.copytree(peft_adapters[index], dst)
        return dst

    return copy


def edit_config(adapter_dir: Path, **changes: object) -> None:
    """Rewrite fields of an adapter's adapter_config.json."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
