"""Refresh the intersphinx inventories cached in docs/_intersphinx/.

Run where the documentation sites can be reached (``python
docs/fetch_inventories.py``); the documentation build itself never goes online.
"""
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _intersphinx_config import PROJECTS  # noqa: E402


def main():
    cache = Path(__file__).resolve().parent / "_intersphinx"
    cache.mkdir(exist_ok=True)
    failed = 0
    for name, url in PROJECTS.items():
        try:
            with urllib.request.urlopen(url + "objects.inv", timeout=30) as response:
                data = response.read()
        except OSError as error:
            print(f"{name}: not fetched ({error})", file=sys.stderr)
            failed += 1
            continue
        (cache / f"{name}.inv").write_bytes(data)
        print(f"{name}: {len(data)} bytes")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
