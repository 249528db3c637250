"""Adaptation hyper-parameters, with per-regime defaults from the SyMerge paper (App. A.1)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from symerge.devices import DeviceName, Precision, check_precision
from symerge.errors import ValidationError

# Paper App. A.1: vision Adam 1e-2 with the head (1e-3 coefficients only), 500 its, batch 32;
# NLP 5e-4, 1,000 its, batch 32; dense 1e-4, 25 its, batch 16.
REGIMES: dict[str, dict[str, float | int]] = {
    "vision": {"lr": 1e-2, "coef_only_lr": 1e-3, "steps": 500, "batch_size": 32},
    "nlp": {"lr": 5e-4, "coef_only_lr": 5e-4, "steps": 1000, "batch_size": 32},
    "dense": {"lr": 1e-4, "coef_only_lr": 1e-4, "steps": 25, "batch_size": 16},
}


class TrainerConfig(BaseModel):
    """How the shared trainer loop runs (all fields overridable; None = the regime's default)."""

    model_config = ConfigDict(extra="forbid")

    regime: Literal["vision", "nlp", "dense"] = "vision"
    steps: int | None = Field(default=None, ge=1, description="iterations; each visits every task once")
    batch_size: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0, description="learning rate of the merging coefficients λ")
    layer_lr: float | None = Field(default=None, gt=0, description="learning rate of the task-specific layers")
    update: Literal["sequential", "summed"] = "sequential"
    seed: int = 0
    device: DeviceName = "cpu"
    precision: Precision = Field(default="fp32", description="autocast dtype of the merged forward and expert pass; "
                                 "λ, task layers and optimizer state stay fp32 (fp16 adds a GradScaler)")
    expert_batch_size: int = Field(default=64, ge=1)
    checkpoint_every: int = Field(default=0, ge=0)
    checkpoint_path: Path | None = None
    resume: bool = False
    progress: bool = True
    log_every: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def precision_fits_device(self) -> "TrainerConfig":
        """Checked here when the device is given, else when resolved (a config file gives the device elsewhere)."""
        problem = check_precision(self.precision, self.device) if "device" in self.model_fields_set else None
        if problem is not None:
            raise ValueError(problem)
        return self

    def resolved(self, coefficients_only: bool = False) -> "TrainerConfig":
        """Fill unset fields from the regime's paper defaults."""
        preset = REGIMES[self.regime]
        lr = self.lr if self.lr is not None else float(preset["coef_only_lr" if coefficients_only else "lr"])
        out = self.model_copy(update={
            "steps": self.steps if self.steps is not None else int(preset["steps"]),
            "batch_size": self.batch_size if self.batch_size is not None else int(preset["batch_size"]),
            "lr": lr,
            "layer_lr": self.layer_lr if self.layer_lr is not None else float(preset["lr"]),
        })
        problem = check_precision(out.precision, out.device)
        if problem is not None:
            raise ValidationError(problem)
        if out.checkpoint_every and out.checkpoint_path is None:
            raise ValidationError("checkpoint_every is set but checkpoint_path is not")
        if out.resume and out.checkpoint_path is None:
            raise ValidationError("resume=True needs checkpoint_path")
        return out
