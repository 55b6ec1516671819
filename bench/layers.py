"""Layer import/export throughput: pyhcs against GNU tar on the same archive and disk.

Builds (once, cached) a tar of about 200 MB / 10,000 files taken from /usr/lib, then runs
several rounds, each timing in turn:

* ``import``: ``import_layer_from_tar`` (every safety check on) into a private store;
* ``tar -x``: ``tar -xf`` of the same file into a fresh directory of the same file system;
* ``export``: ``export_layer_to_tar`` of the imported layer to a file (plain tar);
* ``tar -c``: ``tar -cf`` of the extracted directory to a file;

each followed by ``sync`` outside the timed region, and reports medians and the ratios
(GNU tar time / pyhcs time: above 1 means pyhcs is faster).

    PYTHONPATH=src .venv/bin/python bench/layers.py [--rounds 5] [--mb 200] [--json]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dir", default="/var/tmp/pyhcs-bench-layers")
    args = ap.parse_args()

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
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
    try:
        for r in range(args.rounds + 1):  # round 0 warms the page cache, not counted
            dest = Path(tempfile.mkdtemp(dir=work, prefix="x-"))
            layer_id = f"bench{r}"
            t0 = time.perf_counter()
            import_layer_from_tar(info, layer_id, str(archive))
            t_imp = time.perf_counter() - t0
            subprocess.run(["sync"], check=True)
            t0 = time.perf_counter()
            subprocess.run(["tar", "-xf", str(archive), "-C", str(dest)], check=True)
            t_tar = time.perf_counter() - t0
            subprocess.run(["sync"], check=True)
            out = work / "export.tar"
            t0 = time.perf_counter()
            with open(out, "wb") as fh:
                export_layer_to_tar(fh, os.path.join(info.home_dir, layer_id))
            t_exp = time.perf_counter() - t0
            subprocess.run(["sync"], check=True)
            t0 = time.perf_counter()
            subprocess.run(["tar", "-cf", str(out), "-C", str(dest), "."], check=True)
            t_tarc = time.perf_counter() - t0
            if r:
                results["import"].append(t_imp)
                results["tar -x"].append(t_tar)
                results["export"].append(t_exp)
                results["tar -c"].append(t_tarc)
            destroy_layer(info, layer_id)
            shutil.rmtree(dest)
            out.unlink()
    finally:
        shutil.rmtree(os.environ["PYHCS_ROOT"], ignore_errors=True)
        shutil.rmtree(os.environ["PYHCS_RUN_ROOT"], ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    summary = {
        "archive": {"bytes": size, "files": files},
        "rounds": args.rounds,
        "median_seconds": med,
        "mb_per_s": {k: size / v / 1e6 for k, v in med.items()},
        "import_vs_tar_x": med["tar -x"] / med["import"],
        "export_vs_tar_c": med["tar -c"] / med["export"],
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"archive: {size / 1e6:.0f} MB, {files} entries; {args.rounds} rounds (medians)")
    for k, v in med.items():
        print(f"  {k:8s} {v:7.3f} s  {size / v / 1e6:7.0f} MB/s")
    print(f"  import throughput vs tar -x: {summary['import_vs_tar_x']:.2f}x")
    print(f"  export throughput vs tar -c: {summary['export_vs_tar_c']:.2f}x")


if __name__ == "__main__":
    main()
