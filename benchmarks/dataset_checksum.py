"""What the dataset checksums cost: save and load of N random episodes, with and without them.

    python benchmarks/dataset_checksum.py [--episodes 5000] [--repeats 3]

Collects the recipe's random episodes (seed 123), saves them (sha256 of every file goes into the
manifest) and times `data.load_dataset` (which verifies the checksums, then reads and checks the
values) against the same load with the checksums left out of the manifest (size checks only, as
datasets saved before checksums load), plus the hashing alone. Prints a table and writes
benchmarks/results/dataset_checksum.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import jax

from wm_jax.store import collection, data


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/dataset_checksum.json")
    args = p.parse_args()

    ds = collection.collect(jax.random.key(123), args.episodes, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ds"
        t0 = time.perf_counter()
        data.save_dataset(ds, path)
        save_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in path.iterdir())
        arrow = [f for f in path.iterdir() if f.suffix == ".arrow"]
        hash_s = _best(lambda: [data.sha256_file(f) for f in arrow], args.repeats)
        with_s = _best(lambda: data.load_dataset(path), args.repeats)
        plain = Path(tmp) / "plain"
        shutil.copytree(path, plain)
        manifest = json.loads((plain / data.MANIFEST).read_text())
        del manifest["sha256"]
        (plain / data.MANIFEST).write_text(json.dumps(manifest))
        without_s = _best(lambda: data.load_dataset(plain), args.repeats)

    result = {
        "episodes": args.episodes, "rows": ds.num_rows, "bytes_on_disk": size, "save_s": save_s,
        "sha256_s": hash_s, "load_with_checksums_s": with_s, "load_without_checksums_s": without_s,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "jax": jax.__version__,
    }
    print(f"{args.episodes} episodes, {ds.num_rows} rows, {size / 1e6:.1f} MB on disk ({result['machine']}); "
          f"best of {args.repeats}")
    print(f"{'save (writes the checksums)':<36}{save_s:8.2f} s")
    print(f"{'sha256 of the data files':<36}{hash_s:8.2f} s  ({size / 1e6 / hash_s:.0f} MB/s)")
    print(f"{'load_dataset with checksums':<36}{with_s:8.2f} s")
    print(f"{'load_dataset without (sizes only)':<36}{without_s:8.2f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
