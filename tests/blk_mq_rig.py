"""The test side of the in-process rig (:mod:`mqrt.testing`): a scripted driver."""

from __future__ import annotations

from typing import Any

from mqrt.block.blk_mq_types import BlkMqOps
from mqrt.testing import Rig, ScriptedCpu

__all__ = ["Rig", "ScriptOps", "ScriptedCpu"]


class ScriptOps(BlkMqOps):
    """A driver whose queue_rq answers from a script: a list of statuses consumed one
    per call (then OK); started requests are kept for the test to complete."""

    name = "script"

    def __init__(self, script: list[int] | None = None):
        self.script = list(script or [])
        self.started: list[Any] = []
        self.timed_out: list[int] = []
        self.calls = 0
        self.last_flags: list[bool] = []

    def queue_rq(self, mq, hctx, rq, last):
        self.calls += 1
        self.last_flags.append(last)
        if self.script:
            status = self.script.pop(0)
            if status:
                return status
        mq.start_request(rq)
        self.started.append(rq)
        return 0

    def timeout(self, mq, rq, gen):
        from mqrt.block.blk_mq_types import BlkStatus, EhRet

        self.timed_out.append(rq.id)
        mq.complete_request(rq, gen, status=BlkStatus.TIMEOUT)
        return EhRet.DONE
