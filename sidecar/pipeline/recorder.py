"""The recorder stage: every call the model server answered goes to the traffic memory, unwaited for.

Only calls the server answered (200) are worth replaying, and only modelled ones can be keyed. The
stage hands the call to the control plane (``Observations.seen``, which only queues it: bounded,
overflow counted) and returns; keying, counting and storing happen there (``warmup/recording.py``).
"""

from __future__ import annotations

from ..calls import Call, Reply
from ..planes import Observations
from .stage import Next


class Recorder:
    name = "recorder"

    def __init__(self, observations: Observations) -> None:
        self.observations = observations

    def __repr__(self) -> str:
        return "<Recorder stage>"

    async def __call__(self, call: Call, next: Next) -> Reply:
        reply = await next(call)
        if reply.status == 200 and call.modelled:
            self.observations.seen(call)
        return reply
