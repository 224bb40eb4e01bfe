"""Peer: a hand-written FastAPI server (uvicorn), one tf.function call per request.

    python -m uvicorn bench.peers.fastapi_app:app --workers N   (cwd: the repository)
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel, Field

from bench.peers.model import load, response
from bench.peers.schema import Patient


class PredictionRequest(BaseModel):
    instances: list[Patient] = Field(min_length=1, max_length=10_000)


app = FastAPI()
predict = load()


@app.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@app.post("/api/v1/predictions")
async def predictions(body: PredictionRequest) -> dict:
    rows = [[p.npreg, p.glu, p.bp, p.skin, p.bmi, p.ped, p.age] for p in body.instances]
    return response(predict(rows))
