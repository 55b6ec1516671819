"""Layer import/export throughput: pyhcs against GNU tar on the same archive and disk.

Builds (once, cached) a tar of about 200 MB / 10,000 files taken from /usr/lib, then runs
several rounds, each timing in turn:

* ``import``: ``import_layer_from_tar`` (every safety check on) into a private store;
* ``tar -x``: ``tar -xf`` of the same file into a fresh directory of the same file system;
* ``export``: ``export_layer_to_tar`` of the imported layer to a file (plain tar);
* ``tar -c``: ``tar -cf`` of the extracted directory to a file;

each followed by ``sync`` outside the timed region, and reports medians and the ratios
(GNU tar time / pyhcs time: above 1 means pyhcs is faster). The order of each pair
alternates between rounds: ext4 makes every file creation scan the inodes deleted in the
last minutes (``recently_deleted``), so whichever runs right after a round's clean-up pays
more kernel time (``--keep`` defers every deletion to the end instead).

``--prepare`` (alone, or with ``--only prepare``) times instead, over ``--prepare-rounds``
interleaved rounds:

* ``prepare``: ``prepare_layer`` + ``unprepare_layer`` of an unsized filter-flavour sandbox
  on a chain of 5 imported layers (overlay mount of the 5 ``fs/`` folders, the registry
  updates, the folder lock);
* ``raw``: the same overlay mount and umount of the same 5 lower folders (fresh upper and
  work folders of the same file system), done in-process with the same ``mount(2)`` /
  ``umount2(2)`` calls pyhcs makes (``pyhcs._linux``), without any of pyhcs's bookkeeping.

    PYTHONPATH=src .venv/bin/python bench/layers.py [--rounds 5] [--mb 200] [--json]
    PYTHONPATH=src .venv/bin/python bench/layers.py --only prepare [--prepare-rounds 200]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path


def build_archive(path: Path, target_mb: int, max_files: int = 10_000) -> tuple[int, int]:
    """A tar of regular files (up to 1 MiB each) and symlinks from /usr/lib, about
    *target_mb* MB or *max_files* entries."""
    total = files = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for base, dirs, names in os.walk("/usr/lib"):
            dirs.sort()
            for name in sorted(names):
                p = os.path.join(base, name)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if not (os.path.islink(p) or os.path.isfile(p)):
                    continue
                if not os.path.islink(p) and st.st_size > 1 << 20:
                    continue  # many mid-sized files, like a real image layer
                try:
                    tf.add(p, arcname=p.lstrip("/"), recursive=False)
                except OSError:
                    continue
                files += 1
                total += st.st_size if os.path.isfile(p) and not os.path.islink(p) else 0
                if total >= target_mb << 20 or files >= max_files:
                    return total, files
    return total, files


def _ms(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {
        "median": statistics.median(v) * 1e3,
        "min": v[0] * 1e3,
        "p90": v[min(len(v) - 1, int(len(v) * 0.9))] * 1e3,
    }


def bench_prepare(work: Path, rounds: int) -> dict[str, object]:
    """prepare_layer + unprepare_layer of a 5-layer chain against a raw overlay mount."""
    from pyhcs._layers import (
        DriverInfo,
        create_sandbox_layer,
        destroy_layer,
        import_layer_from_tar,
        prepare_layer,
        unprepare_layer,
    )
    from pyhcs._linux import mount, umount

    info = DriverInfo()
    chain: list[str] = []  # direct parent first
    for i in range(5):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for j in range(20):
                body = f"layer {i} file {j}\n".encode()
                ti = tarfile.TarInfo(f"l{i}/f{j}")
                ti.size = len(body)
                tf.addfile(ti, io.BytesIO(body))
        buf.seek(0)
        chain.insert(0, import_layer_from_tar(info, f"chain{i}", buf, chain))
    create_sandbox_layer(info, "sb", "chain4", chain)
    raw = Path(tempfile.mkdtemp(dir=work, prefix="raw-"))
    for d in ("upper", "work", "merged"):
        (raw / d).mkdir()
    lowers = ":".join(os.path.join(p, "fs") for p in chain)
    data = f"lowerdir={lowers},upperdir={raw}/upper,workdir={raw}/work"
    merged = str(raw / "merged")
    results: dict[str, list[float]] = {"prepare": [], "raw": []}
    try:
        for r in range(rounds + 1):  # round 0 warms up, not counted
            order = ["prepare", "raw"] if r % 2 else ["raw", "prepare"]
            for variant in order:
                if variant == "prepare":
                    t0 = time.perf_counter()
                    prepare_layer(info, "sb", chain)
                    unprepare_layer(info, "sb")
                    dt = time.perf_counter() - t0
                else:
                    t0 = time.perf_counter()
                    mount("overlay", merged, "overlay", 0, data)
                    umount(merged)
                    dt = time.perf_counter() - t0
                if r:
                    results[variant].append(dt)
    finally:
        if os.path.ismount(merged):
            umount(merged)
        shutil.rmtree(raw)
        unprepare_layer(info, "sb")
        for lid in ["sb", *(f"chain{i}" for i in reversed(range(5)))]:
            destroy_layer(info, lid)
    stats = {k: _ms(v) for k, v in results.items()}
    return {
        "rounds": rounds,
        "ms": stats,
        "prepare_vs_raw": stats["prepare"]["median"] / stats["raw"]["median"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dir", default="/var/tmp/pyhcs-bench-layers")
    ap.add_argument("--only", choices=["tar", "prepare"], default=None)
    ap.add_argument("--prepare-rounds", type=int, default=200)
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep every round's trees until the end (no deletions between rounds, so no "
        "ext4 recently-deleted scans; needs 2 x rounds x the archive's size of disk)",
    )
    args = ap.parse_args()

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.only == "prepare":
        os.environ["PYHCS_ROOT"] = tempfile.mkdtemp(dir=work, prefix="root-")
        os.environ["PYHCS_RUN_ROOT"] = tempfile.mkdtemp(dir=work, prefix="run-")
        try:
            pres = bench_prepare(work, args.prepare_rounds)
        finally:
            shutil.rmtree(os.environ["PYHCS_ROOT"], ignore_errors=True)
            shutil.rmtree(os.environ["PYHCS_RUN_ROOT"], ignore_errors=True)
        if args.json:
            print(json.dumps(pres, indent=1))
            return
        print(f"prepare_layer + unprepare_layer, 5-layer chain; {args.prepare_rounds} rounds (ms)")
        for k, v in pres["ms"].items():  # type: ignore[attr-defined]
            print(f"  {k:8s} median {v['median']:6.2f}  min {v['min']:6.2f}  p90 {v['p90']:6.2f}")
        print(f"  prepare+unprepare / raw mount+umount: {pres['prepare_vs_raw']:.2f}x")
        return
    archive = work / f"usr-lib-{args.mb}-v2.tar"
    if not archive.exists():
        size, files = build_archive(archive, args.mb)
    else:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
        files, size = len(members), sum(m.size for m in members)
    os.environ["PYHCS_ROOT"] = tempfile.mkdtemp(dir=work, prefix="root-")
    os.environ["PYHCS_RUN_ROOT"] = tempfile.mkdtemp(dir=work, prefix="run-")
    from pyhcs._layers import (
        DriverInfo,
        destroy_layer,
        export_layer_to_tar,
        import_layer_from_tar,
    )

    info = DriverInfo()
    results: dict[str, list[float]] = {"import": [], "tar -x": [], "export": [], "tar -c": []}
    kept: list[tuple[str, Path]] = []
    try:
        for r in range(args.rounds + 1):  # round 0 warms the page cache, not counted
            dest = Path(tempfile.mkdtemp(dir=work, prefix="x-"))
            layer_id = f"bench{r}"
            out = work / "export.tar"
            times: dict[str, float] = {}

            def run_import() -> None:
                t0 = time.perf_counter()
                import_layer_from_tar(info, layer_id, str(archive))  # noqa: B023
                times["import"] = time.perf_counter() - t0  # noqa: B023

            def run_tar_x() -> None:
                t0 = time.perf_counter()
                subprocess.run(["tar", "-xf", str(archive), "-C", str(dest)], check=True)  # noqa: B023
                times["tar -x"] = time.perf_counter() - t0  # noqa: B023

            def run_export() -> None:
                t0 = time.perf_counter()
                with open(out, "wb") as fh:  # noqa: B023
                    export_layer_to_tar(fh, os.path.join(info.home_dir, layer_id))  # noqa: B023
                times["export"] = time.perf_counter() - t0  # noqa: B023

            def run_tar_c() -> None:
                t0 = time.perf_counter()
                subprocess.run(["tar", "-cf", str(out), "-C", str(dest), "."], check=True)  # noqa: B023
                times["tar -c"] = time.perf_counter() - t0  # noqa: B023

            steps = [run_import, run_tar_x] if r % 2 else [run_tar_x, run_import]
            steps += [run_export, run_tar_c] if r % 2 else [run_tar_c, run_export]
            for step in steps:
                step()
                subprocess.run(["sync"], check=True)
            t_imp, t_tar = times["import"], times["tar -x"]
            t_exp, t_tarc = times["export"], times["tar -c"]
            if r:
                results["import"].append(t_imp)
                results["tar -x"].append(t_tar)
                results["export"].append(t_exp)
                results["tar -c"].append(t_tarc)
            out.unlink()
            if args.keep:
                kept.append((layer_id, dest))
            else:
                destroy_layer(info, layer_id)
                shutil.rmtree(dest)
    finally:
        for layer_id, dest in kept:
            destroy_layer(info, layer_id)
            shutil.rmtree(dest)
        shutil.rmtree(os.environ["PYHCS_ROOT"], ignore_errors=True)
        shutil.rmtree(os.environ["PYHCS_RUN_ROOT"], ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    # each round's own ratio too: the machine's speed drifts between rounds, a pair does not
    pairs = sorted(t / i for i, t in zip(results["import"], results["tar -x"], strict=True))
    summary = {
        "archive": {"bytes": size, "files": files},
        "rounds": args.rounds,
        "median_seconds": med,
        "mb_per_s": {k: size / v / 1e6 for k, v in med.items()},
        "import_vs_tar_x": med["tar -x"] / med["import"],
        "export_vs_tar_c": med["tar -c"] / med["export"],
        "import_vs_tar_x_per_round": pairs,
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"archive: {size / 1e6:.0f} MB, {files} entries; {args.rounds} rounds (medians)")
    for k, v in med.items():
        print(f"  {k:8s} {v:7.3f} s  {size / v / 1e6:7.0f} MB/s")
    print(f"  import throughput vs tar -x: {summary['import_vs_tar_x']:.2f}x "
          f"(round by round: {pairs[0]:.2f}x-{pairs[-1]:.2f}x, median "
          f"{statistics.median(pairs):.2f}x)")
    print(f"  export throughput vs tar -c: {summary['export_vs_tar_c']:.2f}x")


if __name__ == "__main__":
    main()
