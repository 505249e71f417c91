"""The ``launch`` section of the config: where processes run. Read by ``launch/`` only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from configtree import require

__all__ = ["LaunchConfig"]


@dataclass
class LaunchConfig:
    """Where processes run. Read by ``launch/`` only."""

    mode: Literal["local", "submitit_local", "slurm"] = "local"
    ranks: int = 1
    """Processes per node (one per GPU on a GPU node)."""
    nodes: int = 1
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time_min: int = 60
    cpus_per_task: int = 2
    mem_gb: int = 0
    """Memory per node; 0 = the scheduler's default (not requested)."""
    gpus_per_node: int = 0
    """0 = none requested."""
    folder: str = ""
    """submitit log folder; empty = RUN_DIR/submitit."""

    def __post_init__(self) -> None:
        require(self.ranks >= 1, "ranks", "must be >= 1")
        require(self.nodes >= 1, "nodes", "must be >= 1")
        require(self.time_min >= 1, "time_min", "must be >= 1")
        require(
            self.cpus_per_task >= 1, "cpus_per_task", f"must be >= 1, got {self.cpus_per_task}"
        )
        require(
            self.mem_gb >= 0, "mem_gb", f"must be >= 0 (0 = scheduler default), got {self.mem_gb}"
        )
        require(
            self.gpus_per_node >= 0,
            "gpus_per_node",
            f"must be >= 0 (0 = none requested), got {self.gpus_per_node}",
        )
