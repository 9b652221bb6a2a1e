"""``python -m scalearn_fast.site_extension``: build the C++ extension into its cache folder."""

from __future__ import annotations

import time

from . import build, build_directory

if __name__ == "__main__":
    start = time.perf_counter()
    build()
    print(f"scalearn_fast.site_extension: built in {build_directory()} ({time.perf_counter() - start:.0f} s)")
