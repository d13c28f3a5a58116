"""One hivemind peer with a PacedProgressTracker; prints what the DHT saw as JSON.

Run as its own process (hivemind's process-wide key must not leak into the test process).
"""

import json
import sys

import hivemind
from conftest import wait_for
from hivemind.utils.timed_storage import get_dht_time

from spotrain.kernels.paced_progress import PacedProgressTracker


def stored(dht: hivemind.DHT, prefix: str) -> dict | None:
    found = dht.get(f"{prefix}_progress", latest=True)
    if found is None or not isinstance(found.value, dict) or not found.value:
        return None
    return next(iter(found.value.values())).value


def main() -> int:
    interval = float(sys.argv[1])
    dht = hivemind.DHT(start=True)
    tracker = PacedProgressTracker(dht=dht, prefix="paced", target_batch_size=1000, status_loglevel=10,
                                   report_interval=interval, start=True)
    seen = []
    tracker.report_local_progress(0, 8)  # the first report always goes out
    wait_for(lambda: (stored(dht, "paced") or {}).get("samples_accumulated") == 8, 20, "the first report")
    for samples in (16, 24, 32):  # within the interval: held back unless the interval is 0
        tracker.report_local_progress(0, samples)
    try:
        wait_for(lambda: (stored(dht, "paced") or {}).get("samples_accumulated") == 32, 3, "later reports")
        seen.append("steps reported")
    except AssertionError:
        seen.append("steps held back")
    tracker.report_local_progress(1, 0)  # a new epoch: reported at once whatever the pace
    wait_for(lambda: (stored(dht, "paced") or {}).get("epoch") == 1, 20, "the epoch change")
    seen.append("epoch reported")
    started = get_dht_time()
    tracker.shutdown(timeout=20)
    seen.append(f"shut down: {tracker.shutdown_complete.is_set()} in {get_dht_time() - started:.1f}s")
    dht.shutdown()
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
