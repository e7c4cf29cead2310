"""Build ``.devicepkgs/``: what a borrowed GPU machine lacks, as plain directories for PYTHONPATH.

    .venv/bin/python scripts/build_devicepkgs.py [--wheels /tmp/whl]

Target: Python 3.12 (CPython, x86-64 Linux), torch 2.11 cu130, transformers/accelerate/safetensors
present, no network, no pip. Copies from this venv (pure Python, or native code that does not
depend on the Python version): bitsandbytes (native libs: CPU + CUDA 13.0 only), optimum-quanto
(without locally JIT-built extensions), torchao (Python only: its compiled kernels are not needed
for the weight-only configs we use), pydantic, annotated_types, typing_inspection,
typing_extensions. From wheels in ``--wheels`` (``pip download`` them first, see ``--help``):
pydantic_core for cp312 (compiled) and the transformers wheel itself, kept zipped (57 MB
unpacked, too big to carry) and extracted on the device by RUN.txt, which this writes too.
"""

from __future__ import annotations

import argparse
import shutil
import site
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEEP_BNB_LIBS = {"libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"}
COPY = [
    "bitsandbytes", "bitsandbytes-0.50.2.dist-info",
    "optimum", "optimum_quanto-0.2.7.dist-info",
    "torchao", "torchao-0.18.0.dist-info",
    "pydantic", "pydantic-2.14.4.dist-info",
    "annotated_types", "annotated_types-0.8.0.dist-info",
    "typing_inspection", "typing_inspection-0.4.5.dist-info",
    "typing_extensions.py", "typing_extensions-4.16.0.dist-info",
]
#: The device command (run from the repo root; the folder travels as a carry path).
RUN = (
    'export PYTHONPATH=$PWD/.devicepkgs:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false; '
    'nvidia-smi -L; '
    '[ -d .devicepkgs/transformers ] || python3 -m zipfile -e .devicepkgs/transformers-5.24.0-py3-none-any.whl .devicepkgs/; '
    'python3 -c "import transformers" || { echo "transformers 5.24 fails to import: using the installed one"; '
    'rm -rf .devicepkgs/transformers .devicepkgs/transformers-5.24.0.dist-info; '
    '}; '
    'python3 -c "import sys,torch,transformers,pydantic;print(sys.version.split()[0],torch.__version__,torch.version.cuda,torch.cuda.is_available(),transformers.__version__,transformers.__file__,pydantic.__version__)" 2>&1 | tee $OUT/versions.txt; '
    'timeout -k 10 270 python3 -m benchmarks.cuda_check --out $OUT/cuda_check.json 2>&1 | tee $OUT/log.txt'
)
PYDANTIC_CORE = "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"
TRANSFORMERS = "transformers-5.24.0-py3-none-any.whl"


def ignore(directory: str, names: list[str]) -> set[str]:
    skipped = {n for n in names if n in ("__pycache__", "build") or n.endswith(".pyc")}
    if Path(directory).name == "bitsandbytes":
        skipped |= {n for n in names if n.startswith("libbitsandbytes_") and n not in KEEP_BNB_LIBS}
    if Path(directory).name == "torchao" or "/torchao/" in directory + "/":
        skipped |= {n for n in names if n.endswith(".so")}
    return skipped


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog=(
            "wheels: python -m pip download --no-deps --only-binary=:all: --python-version 3.12 "
            "--implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "
            "-d /tmp/whl pydantic_core==2.50.5 transformers==5.24.0"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--wheels", default="/tmp/whl")
    parser.add_argument("--out", default=str(ROOT / ".devicepkgs"))
    args = parser.parse_args()
    site_packages = Path(site.getsitepackages()[0])
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in COPY:
        source = site_packages / name
        if source.is_dir():
            shutil.copytree(source, out / name, ignore=ignore)
        else:
            shutil.copy2(source, out / name)
    wheels = Path(args.wheels)
    with zipfile.ZipFile(wheels / PYDANTIC_CORE) as wheel:
        wheel.extractall(out)
    shutil.copy2(wheels / TRANSFORMERS, out / TRANSFORMERS)
    (out / "RUN.txt").write_text(RUN + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {total / 2**20:.1f} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
