"""A test-only fault hook: hang a controller right after a cloud accepted a launch.

Set SPOTRAIN_TEST_HANG_AFTER_LAUNCH to a directory and every cloud adapter, once its launch
call has returned and before it returns the instance, writes `<request-id>.launched` there and
sleeps until killed. Tests use it to SIGKILL a controller between a launch request and its
response; never set it outside tests.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "SPOTRAIN_TEST_HANG_AFTER_LAUNCH"


def after_launch_call(request_id: str) -> None:
    where = os.environ.get(ENV)
    if not where:
        return
    marker = Path(where) / f"{request_id}.launched"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    while True:  # until the test kills this process
        time.sleep(3600)
