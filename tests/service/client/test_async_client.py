"""The asyncio client against the real service: the same operations and answers as the synchronous one, several
requests in flight on one client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from ood_core.detector import EnergyBased
from ood_core.state import save_detector
from service.client import AsyncOODClient, ImageScore, OODClient, ProblemError
from tests.service.conftest import API_KEY, digit_png, noise_png

pytestmark = pytest.mark.timeout(120)


def _scores(results: list[ImageScore]) -> list[float | None]:
    """Every verdict's score, image by image (batches of other sizes round differently in the last digits)."""
    return [v.score for r in results for _, v in sorted(r.detectors.items())]


def test_async_operations_answer_like_the_sync_client(live_server: str, tmp_path: Path) -> None:
    state = tmp_path / "energy.safetensors"
    state.write_bytes(save_detector(EnergyBased(t=3.0)))
    images = [digit_png(i) for i in range(4)] + [noise_png(i) for i in range(4)]
    with OODClient(live_server, api_key=API_KEY) as sync:
        models, expected = sync.models(), sync.score("digits", images)

    async def scenario() -> None:
        async with AsyncOODClient(live_server, api_key=API_KEY) as client:
            assert await client.models() == models
            answers = await asyncio.gather(*(client.score("digits", image) for image in images))  # concurrently
            assert _scores([a.results[0] for a in answers]) == pytest.approx(_scores(expected.results), rel=1e-4)
            batch = await client.score("digits", images)
            assert _scores(batch.results) == pytest.approx(_scores(expected.results), rel=1e-4)
            assert [r.prediction.index for r in batch.results] == [r.prediction.index for r in expected.results]
            assert (await client.upload_state("digits", "async-energy", state)).version == 1  # streamed
            copy = tmp_path / "copy.safetensors"
            assert await client.download_state("digits", "async-energy", copy) == state.read_bytes()
            assert copy.read_bytes() == state.read_bytes()
            assert "async-energy" in [d.name for d in await client.detectors("digits")]
            assert [v.source for v in (await client.versions("digits", "async-energy")).versions] == ["upload"]
            segment = await client.segment("digits-seg", np.zeros((64, 64), dtype=np.uint8), format="json")
            maps = segment.results[0].detectors
            assert set(maps) == {"energy", "entropy", "maxlogit"} and maps["energy"].map.format == "json"
            assert (await client.drift("digits")).model == "digits"
            await client.delete_state("digits", "async-energy")
            with pytest.raises(ProblemError) as err:
                await client.model("nope")
            assert err.value.status == 404

    asyncio.run(scenario())
