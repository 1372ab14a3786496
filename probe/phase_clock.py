"""Wall and CPU seconds of a process's consecutive phases: CPU time (`time.process_time`, every thread of the
process) stays meaningful on a machine whose cores other work shares, where wall time does not."""

from __future__ import annotations

import time

__all__ = ["PhaseClock"]


class PhaseClock:
    """`lap(name)` records the wall and CPU seconds since the previous lap (or the clock's start) under `name`."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.phases[name] = {"wall_s": round(wall - self._wall, 4), "cpu_s": round(cpu - self._cpu, 4)}
        self._wall, self._cpu = wall, cpu
