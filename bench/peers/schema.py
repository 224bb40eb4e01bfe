"""One patient, as both peers validate it (pydantic, as a FastAPI or BentoML user writes it):
the same fields and bounds as app/schema.py."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Patient(BaseModel):
    model_config = ConfigDict(extra="forbid")
    npreg: int = Field(ge=0, le=20)
    glu: float = Field(ge=0, le=300)
    bp: float = Field(ge=0, le=200)
    skin: float = Field(ge=0, le=100)
    bmi: float = Field(ge=0, le=80)
    ped: float = Field(ge=0, le=3)
    age: int = Field(ge=0, le=120)
