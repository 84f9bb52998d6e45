"""Start a private PostgreSQL and Redis (the test suite's launchers), write
their URLs to DIR/urls.env, and keep them until SIGTERM; then stop both.

    python bench/services_up.py DIR

Used by bench/shared_state.sh, which pins this process (and so both servers,
its children) to the gateway's CPU and counts their CPU as the gateway's.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.services import PostgresServer, RedisServer


def main() -> None:
    out = Path(sys.argv[1])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with PostgresServer.start() as pg, RedisServer.start() as redis:
        url = pg.create_database("bench")
        (out / "urls.env").write_text(
            f"export MODELFLEET_DATABASE_URL={url}\nexport MODELFLEET_REDIS_URL={redis.url}\n")
        print(f"postgres pid {pg.proc.pid} on {pg.port}; redis pid "
              f"{redis.proc.pid if redis.proc else '?'} on {redis.port}", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
