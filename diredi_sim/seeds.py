"""Every seed of a run, from one function (docs/design.md section 7: same config, same seed, same numbers).

``derive_seed(run_seed, stage, partition=, round=, replicate=)``: the manufacturer's stages use
the run seed itself plus a fixed offset per stage (replicates share one manufacturer); a
customer's stages start from its own seed, ``run_seed + replicate + 1009 * partition`` (so that
partition 0 of replicate k is the one-customer ``paper`` flow's seed k), plus the stage's offset;
local differential privacy's noise also depends on the round. The offsets are the numbers every
earlier run used, so results stay reproducible across this refactor.
"""

from __future__ import annotations

from dataclasses import dataclass

# The offset added for each stage; RD A and RD B share "rd", so that Tutor1 and Tutor2 differ by
# their data only.
STAGE_OFFSETS = {
    "teacher": 0, "distill_a": 1, "distill_b": 2,  # the manufacturer's (run seed)
    "customer": 0, "rd": 3, "distill_c": 5, "direct": 6, "fedavg": 7, "local": 8,  # a customer's
}
MANUFACTURER_STAGES = ("teacher", "distill_a", "distill_b")
PARTITION_STRIDE = 1009


def derive_seed(run_seed: int, stage: str, *, partition: int = 0, round: int = 0, replicate: int = 0) -> int:
    """The seed of ``stage`` (a key of :data:`STAGE_OFFSETS`, or ``"dp"``: the noise of local DP,
    which also depends on ``round``) for customer ``partition`` in replicate ``replicate``."""
    if stage in MANUFACTURER_STAGES:
        return run_seed + STAGE_OFFSETS[stage]
    customer = run_seed + replicate + PARTITION_STRIDE * partition
    if stage == "dp":
        return customer + 7919 * round + 17
    if stage not in STAGE_OFFSETS:
        raise ValueError(f"seed for unknown stage {stage!r}; stages: {sorted(STAGE_OFFSETS) + ['dp']}")
    return customer + STAGE_OFFSETS[stage]


@dataclass(frozen=True)
class Seeds:
    """One customer's seeds in one replicate: ``seeds("rd")`` is :func:`derive_seed` of its stage."""

    run: int
    partition: int = 0
    replicate: int = 0

    def __call__(self, stage: str, round: int = 0) -> int:
        return derive_seed(self.run, stage, partition=self.partition, round=round, replicate=self.replicate)

    @property
    def customer(self) -> int:
        """The customer's own seed (what a replicate's folder is named after)."""
        return self("customer")


__all__ = ["derive_seed", "Seeds", "STAGE_OFFSETS"]
