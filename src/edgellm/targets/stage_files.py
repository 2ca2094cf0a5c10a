"""The quant/ stage's weight files as a native target reads them, removed as soon as they are read.

Without --keep-intermediates a complete build keeps no quant/ files (build.py), but removing them
only at the end would put two copies of the weights on disk at once: quant/ and the target's
weights.bin. So the lowering reports each initializer whose bytes it reads (every large one is
read once per build: WeightsFile.once), and a .data file goes as soon as every initializer the
linked programs take from it has been read: quant/ shrinks while weights.bin grows. A layer's
group and single files are hard links of one file (build.py _share_with_twin), so a file is
known by its inode and goes with all its names.

The manifest marks a unit dropped before its file goes, so a compile that fails after that is
resumed by quantizing that unit again, never by trusting a file that is gone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx

log = logging.getLogger("edgellm.targets")


class StageFiles:
    def __init__(self, stage_dir: Path, manifest, programs: list[onnx.ModelProto]):
        self.stage_dir = Path(stage_dir)
        self.manifest = manifest
        self.unread: dict[int, set[str]] = {}  # inode -> initializers not yet read from it
        self.where: dict[str, set[int]] = {}  # initializer -> the files holding it (group's and single's)
        self.inode: dict[str, int] = {}  # file -> inode
        for program in programs:
            for t in program.graph.initializer:
                location = _location(t)
                if location is not None:
                    if location not in self.inode:
                        self.inode[location] = os.stat(location).st_ino
                    self.where.setdefault(t.name, set()).add(self.inode[location])
                    self.unread.setdefault(self.inode[location], set()).add(t.name)
        self.paths: dict[int, list[Path]] = {}  # every name of each file (the twins' hard links)
        for path in sorted(self.stage_dir.rglob("*.data")):
            inode = path.stat().st_ino
            if inode in self.unread:
                self.paths.setdefault(inode, []).append(path)
        self.gone: set[int] = set()

    def read(self, t: onnx.TensorProto) -> None:
        """t's bytes are read now (from its own file, which must still be there); every file holding
        the same initializer (the other variant's) is done with it too: it is read once per build."""
        location = _location(t)
        if location is None or location not in self.inode:
            return
        if self.inode[location] in self.gone:  # a read outside WeightsFile.once: a bug in the lowering, not bad input
            raise RuntimeError(f"{t.name} is read again after its file {location} was removed")
        for inode in self.where[t.name]:
            self.unread[inode].discard(t.name)

    def release(self) -> None:
        """Remove every file whose initializers have all been read."""
        done = [inode for inode, names in self.unread.items() if not names and inode not in self.gone]
        if not done:
            return
        units = self.manifest.data.get("units", {})
        for inode in done:
            for path in self.paths.get(inode, []):
                entry = units.get("quantize:" + path.relative_to(self.stage_dir).with_suffix("").as_posix())
                if entry is not None:
                    entry["dropped"] = True
        self.manifest.save()  # first: the manifest never vouches for a file that is gone
        for inode in done:
            self.gone.add(inode)
            for path in self.paths.get(inode, []):
                log.debug("read, removed: %s", path)
                path.unlink(missing_ok=True)


def _location(t: onnx.TensorProto) -> str | None:
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return next(e.value for e in t.external_data if e.key == "location")
