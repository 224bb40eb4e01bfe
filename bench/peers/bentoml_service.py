"""Peer: BentoML with adaptive batching (its documented two-service pattern).

    bentoml serve bench.peers.bentoml_service:Pima   (cwd: the repository)

`Pima` answers /api/v1/predictions with modelserve's request and response shapes and sends each
request's rows to `PimaModel.score`, a batchable API: BentoML's adaptive dispatcher gathers the
rows of concurrent requests into one tf.function call.
"""

from __future__ import annotations

import bentoml
import numpy as np
from pydantic import Field

from bench.peers.model import load, response
from bench.peers.schema import Patient


@bentoml.service(workers=1)
class PimaModel:
    def __init__(self) -> None:
        self.predict = load()

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=10_000)
    def score(self, x: np.ndarray) -> np.ndarray:
        return self.predict(x)


@bentoml.service(workers=1)
class Pima:
    model = bentoml.depends(PimaModel)

    @bentoml.api(route="/api/v1/predictions")
    async def predictions(self, instances: list[Patient] = Field(min_length=1, max_length=10_000)) -> dict:  # noqa: B008
        rows = np.array([[p.npreg, p.glu, p.bp, p.skin, p.bmi, p.ped, p.age] for p in instances],
                        dtype=np.float32)
        return response(await self.model.to_async.score(rows))
