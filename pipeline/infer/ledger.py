"""A run's chip ledger: which chips were in flight when a predictor died ("strikes").

It must outlive any predictor actor and be reachable from every node, so it is a small Ray
actor of the run (:class:`LedgerBook`, no CPU, started by the driver while the run's graph
is built) that the predictors ask through :class:`ChipLedger`. This module imports
nothing heavy: the ledger's worker process imports only it and Ray.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any


class LedgerBook:
    """The ledger's state, one Ray actor per run: the keys of the calls in flight, and each
    chip running alone with the strikes it had when it started."""

    def __init__(self) -> None:
        self.calls: set[str] = set()
        self.alone: dict[str, int] = {}

    def enter(self, call_key: str, chip_ids: list[str]) -> list[int]:
        if call_key not in self.calls:
            self.calls.add(call_key)
            return [0] * len(chip_ids)
        return [1 + self.alone.get(cid, 0) for cid in chip_ids]

    def leave(self, call_key: str) -> None:
        self.calls.discard(call_key)

    def enter_alone(self, chip_id: str, strikes: int) -> None:
        self.alone[chip_id] = strikes

    def leave_alone(self, chip_id: str) -> None:
        self.alone.pop(chip_id, None)


@dataclass(frozen=True)
class ChipLedger:
    """A run's record of the chips that were in flight when a predictor died ("strikes").

    A call marks its chips in flight under one key, a digest of their ids, and clears it
    when done. Ray Data retries a block whose actor died with the same rows, so a retried
    call finds its key: one of its chips killed the predictor. Its chips then run one at a
    time, each marked on its own with the strikes it holds, and a chip still marked at the
    next retry killed the predictor while it ran alone.

    `book` is the handle of the run's :class:`LedgerBook` actor (:meth:`start`); picklable,
    so the predictors get it in their constructor's arguments."""

    run_id: str
    book: Any

    @classmethod
    def start(cls, run_id: str) -> "ChipLedger":
        """Start the run's ledger actor (the driver, before the graph). Returns at once: the
        actor's process starts while the graph is built, and calls wait for it. Owned by the
        driver, so it ends with the driver's job too; on the driver's node, so that losing
        another node (and the predictors on it) never loses the ledger."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        book = ray.remote(num_cpus=0, max_restarts=0)(LedgerBook).options(
            name=f"chip-ledger-{run_id}", scheduling_strategy=here).remote()
        return cls(run_id, book)

    @staticmethod
    def call_key(chip_ids: list[str]) -> str:
        return hashlib.blake2b("\n".join(chip_ids).encode(), digest_size=16).hexdigest()

    def enter(self, chip_ids: list[str]) -> list[int]:
        """Mark a call's chips in flight -> their strikes: 0 each on the call's first try;
        on a retry 1 each, and one more than it holds for a chip that ran alone."""
        import ray

        return ray.get(self.book.enter.remote(self.call_key(chip_ids), chip_ids))

    def leave(self, chip_ids: list[str]) -> None:
        """The call is done (its chips predicted or quarantined)."""
        import ray

        ray.get(self.book.leave.remote(self.call_key(chip_ids)))

    def enter_alone(self, chip_id: str, strikes: int) -> None:
        """Mark one chip, running on its own, in flight with the strikes it has."""
        import ray

        ray.get(self.book.enter_alone.remote(chip_id, strikes))

    def leave_alone(self, chip_id: str) -> None:
        import ray

        ray.get(self.book.leave_alone.remote(chip_id))

    def clear(self) -> None:
        """End the run's ledger (the driver, when its stream has ended)."""
        import ray

        ray.kill(self.book)
