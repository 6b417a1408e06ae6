import time

from tests.release import build_release, push_release
from tests.upstream import distribution_upstream, token_service, upstream_client

__all__ = ["distribution_upstream", "token_service", "upstream_client"]


def test_t(upstream_client, capsys):
    r0 = build_release("4.99.0")
    r1 = build_release("4.99.1", base=r0)
    t = time.perf_counter()
    s = push_release(r1, upstream_client)
    t1 = time.perf_counter()
    s2 = push_release(r1, upstream_client)
    t2 = time.perf_counter()
    with capsys.disabled():
        print(f"\nfirst push {t1 - t:.2f}s {s}; second {t2 - t1:.2f}s {s2}")
        r = build_release("4.99.2", components=190)
        print(r.summary())
