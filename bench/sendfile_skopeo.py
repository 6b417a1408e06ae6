"""Why a skopeo pull from bastion can take longer than from distribution on loopback.

bastion serves blobs with sendfile(2) (aiohttp ``FileResponse`` through ``server/loop.py``);
distribution 2.8.2 copies them through user space (read(2)/write(2), 32 KiB at a time). On
loopback the receiving socket gets the sender's buffers as they are, so the two ways of sending
can cost the *client* different CPU. This benchmark isolates that one difference:

  direct     skopeo copy from the upstream (distribution behind token auth, as pullthrough.py)
  sendfile   skopeo copy from a warm bastion cache, blobs sent with sendfile(2) (the default)
  copy       the same, one more bastion on its own warm store, started with
             ``AIOHTTP_NOSENDFILE=1`` (aiohttp's own switch: FileResponse reads the file in
             chunks and writes them to the socket): a diagnostic, not a mode bastion offers

Every round pulls ``app`` (one --layer-size layer and four small blobs) with
``skopeo copy docker://... dir:`` from each peer, order rotating, and records wall time and
skopeo's CPU time (wait4). Printed: medians, and paired ratios to direct.

  .venv/bin/python bench/sendfile_skopeo.py [--rounds 8] [--layer-size 256MiB]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from contextlib import ExitStack

from common import (
    BenchError,
    Skopeo,
    fmt_ratio,
    fmt_size,
    median,
    paired_ratio,
    parse_size,
    render_table,
    skipped,
    tmpdir,
)

PEERS = ("direct", "sendfile", "copy")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8, help="rounds (default 8)")
    p.add_argument("--layer-size", default="256MiB", help="the big layer (default 256MiB)")
    p.add_argument("--workers", type=int, default=2, help="bastion --workers (default 2)")
    p.add_argument("--tmp", default="/tmp", help="where the temporary directory goes")
    args = p.parse_args(argv)
    try:
        layer_size = parse_size(args.layer_size)
    except ValueError as e:
        p.error(str(e))
    if args.rounds < 1:
        p.error("need --rounds >= 1")
    skip = skipped("sendfile_skopeo", "docker-registry", "skopeo")
    if skip is not None:
        return skip
    import pullthrough as pt

    t0 = time.monotonic()
    wall: dict[str, list[float]] = {n: [] for n in PEERS}
    cpu: dict[str, list[float]] = {n: [] for n in PEERS}
    with tmpdir(prefix="bastion-bench-sendfile-", base=args.tmp) as tmp, ExitStack() as stack:
        up = stack.enter_context(pt.TokenUpstream(tmp / "upstream"))
        pt.log(f"seeding the upstream ({fmt_size(layer_size)} layer)")
        images, _ = pt.seed_upstream(up, tmp, layer_size, 1 << 20, 1)
        image = images["app"]
        authfile = up.write_authfile(tmp / "pull-secret.json", pt.NAMESPACE)
        config = tmp / "bastion.yaml"
        config.write_text(
            f"log_level: warning\nupstreams:\n  {pt.NAMESPACE}:\n    url: {up.url}\n"
            f"    authfile: {authfile}\n"
        )
        skopeo = Skopeo(tmp / "skopeo")
        out = tmp / "pulled"
        peers = {
            "direct": pt.Peer("direct", "direct", up.host, "", creds=up.credentials),
        }
        for name, env in (("sendfile", {}), ("copy", {"AIOHTTP_NOSENDFILE": "1"})):
            b = pt.Bastion(tmp / name, workers=args.workers, extra_args=["--config", str(config)])
            b.env = env
            stack.enter_context(b)
            peer = pt.Peer(
                name, b.label, f"{b.host}:{b.port}", f"{pt.NAMESPACE}/", b, pt._bastion_blob(b.root)
            )
            pt.skopeo_pull(skopeo, peer, image, out)  # warm its cache
            err = peer.settle([d for d, _ in image.blobs])
            if err:
                raise BenchError(err)
            peers[name] = peer
        for r in range(args.rounds):
            order = list(PEERS[r % 3 :] + PEERS[: r % 3])
            for name in order:
                peer = peers[name]
                shutil.rmtree(out, ignore_errors=True)
                res = skopeo.copy(peer.ref(image), f"dir:{out}", src_creds=peer.creds)
                if not res.ok:
                    raise BenchError(f"{name}: {res.describe()}")
                wall[name].append(res.elapsed)
                cpu[name].append(res.cpu_s)
                pt.log(f"round {r + 1} {name:8} {res.elapsed:.2f} s, skopeo cpu {res.cpu_s:.2f} s")
        version = skopeo.version()

    rows = []
    for name in PEERS:
        rows.append(
            [
                name,
                f"{median(wall[name]):.2f}",
                f"{median(cpu[name]):.2f}",
                "" if name == "direct" else fmt_ratio(paired_ratio(wall[name], wall["direct"])),
                "" if name == "direct" else fmt_ratio(paired_ratio(cpu[name], cpu["direct"])),
            ]
        )
    print()
    print(
        f"skopeo {version} pull of app ({fmt_size(layer_size)} layer) to dir:, warm bastion caches, "
        f"{os.cpu_count()} CPUs, {time.monotonic() - t0:.0f} s total"
    )
    print(
        render_table(
            [["peer", "wall s", "skopeo cpu s", "wall/direct", "cpu/direct"]],
            rows,
            separators=(1, 3),
        )
    )
    print(
        f"{args.rounds} rounds, medians; ratios: median over rounds of peer_i / direct_i (< 1: faster)."
    )
    print("direct = distribution 2.8.2 (read/write copy); sendfile = bastion as shipped;")
    print("copy = bastion with AIOHTTP_NOSENDFILE=1 (a diagnostic; not a supported mode).")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"sendfile_skopeo: {e}", file=sys.stderr)
        sys.exit(1)
